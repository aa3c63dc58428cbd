"""Per-tensor checksums written at save time (hub.save_quantized) and the opt-in verify (inspect --verify,
hub.load(verify=True))."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from models import TINY_MODELS
from safetensors.torch import load_file, save_file

from diffusers_svdquant import SVDQuantConfig, hub
from diffusers_svdquant.hub.checksums import CHECKSUM_FILE, verify_checksums

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def saved(tmp_path):
    tiny = TINY_MODELS["flux"]
    torch.manual_seed(0)
    tiny.build().to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model = tiny.cls.from_pretrained(tmp_path / "src", dtype=torch.bfloat16, quantization_config=SVDQuantConfig(rank=8))
    return hub.save_quantized(model, tmp_path / "q")


def test_save_quantized_records_every_tensor_and_verify_passes(saved):
    recorded = json.loads((saved / CHECKSUM_FILE).read_text())["files"]
    assert set(recorded[WEIGHTS]) == set(load_file(saved / WEIGHTS))
    assert verify_checksums(saved) == []


def test_a_changed_tensor_is_named(saved):
    tensors = load_file(saved / WEIGHTS)
    name = next(k for k in sorted(tensors) if k.endswith(".qweight"))
    tensors[name][0, 0] ^= 1  # one flipped bit in a 4-bit code
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})
    problems = verify_checksums(saved)
    assert len(problems) == 1 and problems[0].startswith(f"{WEIGHTS}: tensor {name!r} changed (crc32 ")
    with pytest.raises(ValueError, match=rf"checksums.*{name}"):
        hub.load(str(saved), verify=True)


def test_plain_save_pretrained_has_no_checksums(tmp_path):
    torch.manual_seed(0)
    TINY_MODELS["flux"].build().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="only checkpoints saved by hub.save_quantized"):
        verify_checksums(tmp_path)


def test_inspect_verify_command(saved):
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "svdquant_cli", "inspect", str(saved), "--verify"], capture_output=True, text=True
    )
    ok = run()
    assert ok.returncode == 0 and "checksums: every tensor matches" in ok.stdout, ok.stderr[-2000:]
    tensors = load_file(saved / WEIGHTS)
    name = next(k for k in sorted(tensors) if k.endswith(".wscales"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, saved / WEIGHTS, metadata={"format": "pt"})
    bad = run()
    assert bad.returncode == 1 and name in bad.stderr
