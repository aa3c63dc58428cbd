"""The ``svdquant`` command and the demo (the README's main job) on a small FLUX.1-shaped model."""

from __future__ import annotations

import re

import pytest

from diffusers_svdquant.apps import cli, demo


def test_svdquant_command_lists_demo(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    assert "no-such-command" in capsys.readouterr().err


def test_demo_runs_end_to_end(capsys):
    """One real FLUX.1 single block (3072 wide), fp32 so the 16-bit side is fast on any CPU: the demo
    quantizes on load, generates, and prints memory, quality and speed."""
    assert cli.main(["demo", "--blocks", "0,1", "--dtype", "fp32", "--steps", "1", "--image-tokens", "16",
                     "--text-tokens", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "CPU capability" in out
    smaller = float(re.search(r"\(([\d.]+)x smaller\)", out).group(1))
    # Measured 1.87x: with a single block, the fp32 embedders, AdaLN and output linears kept 16-bit
    # weigh as much as the quantized block.
    assert smaller > 1.6
    rel = float(re.search(r"relative error ([\d.]+)", out).group(1))
    assert rel < 0.05
    assert re.search(r"speed per denoiser call: fp32 [\d.]+ s, W4A4 [\d.]+ s", out)


def test_demo_rejects_a_model_it_cannot_drive(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32,), norm_num_groups=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no input recipe for AutoencoderKL|no linear layer"):
        demo.main(["--model", str(tmp_path), "--dtype", "fp32"])
