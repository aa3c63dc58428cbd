"""A checkpoint saved by an earlier version of the package loads bit-identically (tests/fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from models import TINY_MODELS, run
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_svdquant import SVDQuantLinear, ops

FIXTURE = Path(__file__).parent / "fixtures" / "flux_tiny_v1"


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(FIXTURE)


def test_old_checkpoint_loads_every_tensor_bit_identically(model):
    saved = load_file(FIXTURE / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    assert sorted(state) == sorted(saved)
    for name, t in saved.items():
        assert state[name].dtype == t.dtype, name
        assert torch.equal(state[name], t), name


def test_old_checkpoint_selects_the_same_layers(model):
    saved = load_file(FIXTURE / "diffusion_pytorch_model.safetensors")
    quantized = {n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}
    assert quantized == {k.removesuffix(".qweight") for k in saved if k.endswith(".qweight")}
    assert model.dtype == torch.bfloat16


def test_old_checkpoint_gives_the_same_output(model):
    with safe_open(FIXTURE / "expected_output.safetensors", framework="pt") as f:
        expected, isa = f.get_tensor("output"), f.metadata()["cpu_isa"]
    out = run(model, TINY_MODELS["flux"].inputs(torch.bfloat16))
    if ops.cpu_isa() == isa:
        assert torch.equal(out, expected)
    else:  # another instruction path rounds the float epilogue differently
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
