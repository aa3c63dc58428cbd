"""The ``svdquant`` command and the demo (the README's main job) on a small FLUX.1-shaped model."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import svdquant_cli
from diffusers_svdquant.apps import cli, demo
from diffusers_svdquant.calibration.stats import DEFAULT_MAX_SAMPLES
from diffusers_svdquant.config import DEFAULT_RANK
from diffusers_svdquant.dtypes import DTYPES
from svdquant_cli import arguments

ROOT = Path(__file__).resolve().parents[1]


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
    assert re.search(r"speed per denoiser call: fp32 [\d.]+ s, SVDQuant [\d.]+ s", out)


def test_demo_rejects_a_model_it_cannot_drive(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32,), norm_num_groups=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no input recipe for AutoencoderKL|no linear layer"):
        demo.main(["--model", str(tmp_path), "--dtype", "fp32"])


# --- the light command line: fast help, defaults shown, missing paths refused ---------------------------------

# Runs `python -m svdquant_cli ARGV...` (TARGET a module) or `python SCRIPT ARGV...` (TARGET a .py file) in this fresh
# interpreter; prints, as stderr's last line, the exit code and which heavy modules got imported. Help goes to stdout.
PROBE = """
import json, runpy, sys
target = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "diffusers", "transformers", "diffusers_svdquant") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _probe(target: str, argv: list[str], cwd=None) -> tuple[dict, str, str]:
    """(verdict, stdout, the rest of stderr) of ``target`` run with ``argv`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, target, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    *err, verdict = proc.stderr.strip().splitlines()
    return json.loads(verdict), proc.stdout, "\n".join(err)


@pytest.mark.parametrize("argv", [["--help"]] + [[c.name, "--help"] for c in svdquant_cli.COMMANDS], ids=" ".join)
def test_help_imports_neither_torch_nor_diffusers(argv, tmp_path):
    """``svdquant [COMMAND] --help`` answers from the light package: nothing of torch, diffusers or transformers is
    imported (the reason it takes a tenth of a second instead of several; see benchmarks/bench_cli_startup.py)."""
    verdict, out, _ = _probe("svdquant_cli", argv, tmp_path)
    assert verdict == {"code": 0, "heavy": []}
    assert out.startswith(f"usage: svdquant {argv[0] if len(argv) > 1 else ''}".rstrip())


def test_a_missing_path_is_refused_before_torch_is_imported(tmp_path):
    verdict, _, err = _probe("svdquant_cli", ["quantize", "./no-such-dir", "--out", "x"], tmp_path)
    assert verdict == {"code": 2, "heavy": []}
    assert err.count("\n") == 0 and "'./no-such-dir' does not exist" in err


def test_the_console_script_is_the_light_entry_point():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="svdquant")
    assert script.value == "svdquant_cli:main"


def test_every_command_runs_an_existing_function():
    """The light package names each command's function as text (importing it would import torch): it must exist."""
    for command in svdquant_cli.COMMANDS:
        module, _, function = command.run.partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), command.run


@pytest.mark.parametrize("name", ["inspect_repo", "pull_and_generate", "quantize_and_push"])
def test_hub_script_help_imports_neither_torch_nor_diffusers(name):
    verdict, out, _ = _probe(str(ROOT / "hub_scripts" / f"{name}.py"), ["--help"])
    assert verdict == {"code": 0, "heavy": []}
    assert "(default: HF_TOKEN or the saved login)" in out


def test_the_light_constants_are_the_librarys():
    """``svdquant_cli`` cannot import the library (torch) for these, so it writes them once; they must agree."""
    assert arguments.DTYPE_NAMES == tuple(sorted(DTYPES))
    assert arguments.DEFAULT_RANK == DEFAULT_RANK
    assert arguments.DEFAULT_MAX_SAMPLES == DEFAULT_MAX_SAMPLES


def _command_parsers():
    for command in svdquant_cli.COMMANDS:
        p = argparse.ArgumentParser(prog=f"svdquant {command.name}", formatter_class=arguments.HelpFormatter)
        command.add_arguments(p)
        yield command.name, p


@pytest.mark.parametrize(("name", "parser"), list(_command_parsers()), ids=[c.name for c in svdquant_cli.COMMANDS])
def test_every_option_shows_its_default(name, parser):
    """Every option that takes a value says its default: the value itself, or in words where it is not a value
    (``--token``: HF_TOKEN or the saved login). Flags are off by default; required arguments have none."""
    shown = " ".join(parser.format_help().split())
    assert "(default: None)" not in shown
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if action.nargs == 0 or action.required:
            continue
        text = action.help if "(default" in action.help else f"{action.help} (default: {action.default})"
        assert " ".join(text.split()) in shown, action.dest


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        svdquant_cli.main(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--rank RANK rank of the 16-bit low-rank branch (default: 32)" in shown
    assert "--dtype {bf16,fp16,fp32} 16-bit dtype of the model (default: bf16)" in shown


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["quantize", "./no-such-dir", "--out", "x"], "./no-such-dir"),
        (["calibrate", "./nope", "--out", "s.safetensors"], "./nope"),
        (["push", "./nope", "me/repo"], "./nope"),
        (["eval", "./nope"], "./nope"),
        (["inspect", "no/such/folder"], "no/such/folder"),
        (["demo", "--model", "~/no-such-model"], "~/no-such-model"),
        (["generate", "me/repo", "--prompt", "a cat", "--out", "c.png", "--base", "/no/such"], "/no/such"),
        (["quantize", ".", "--calibration", "missing.safetensors", "--out", "x"], "missing.safetensors"),
    ],
)
def test_a_missing_local_path_is_one_line_and_exit_2(argv, path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path!r} does not exist" in err and err.startswith(f"svdquant {argv[0]}: ")


def test_a_hub_repo_id_or_an_existing_folder_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "alice" / "model").mkdir(parents=True)
    parse = functools.partial(arguments.parse_args, svdquant_cli.build_parser())
    assert parse(["inspect", "alice/flux-svdq"]).repo == "alice/flux-svdq"  # owner/name: a Hub repo id
    assert parse(["inspect", "alice/model/"]).repo == "alice/model/"
    assert parse(["quantize", "~/alice", "--out", "x"]).model == str(tmp_path / "alice")  # expanded
    assert not arguments.looks_local("alice/flux-svdq")
    assert all(map(arguments.looks_local, ["./m", "../m", "/m", "~/m", "a/b/c", "alice"]))


def test_quantize_out_folder_gets_the_umask_mode(tmp_path):
    """--out is built in a temporary folder and renamed into place: its folders must end with the mode a plain
    mkdir gives under the umask, not mkdtemp's private 0700, and its files the mode a plain open() gives, not the
    0600 that safetensors 0.8 (issue #782) and mkstemp create files with."""
    from models import TINY_MODELS

    model = tmp_path / "model16"
    TINY_MODELS["flux"].build().save_pretrained(model)
    old = os.umask(0o027)  # not the common 022: a hard-coded 0755 would fail too
    try:
        (tmp_path / "ref").mkdir()
        assert cli.main(["quantize", str(model), "--rank", "8", "--dtype", "fp32", "--out", str(tmp_path / "q")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "q"
    assert (out / "config.json").is_file()
    expected = oct(stat.S_IMODE((tmp_path / "ref").stat().st_mode))
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        assert oct(stat.S_IMODE(folder.stat().st_mode)) == expected, folder
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".md"}
    for path in files:
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(0o640), path
