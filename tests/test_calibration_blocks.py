"""The block-level check (calibration.blocks): the blocks found, their recorded inputs, the block error and the
per-block choice between smoothings; and the held-out-scored search (calibration.search.heldout_search)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import TINY_MODELS, run
from torch import nn

from diffusers_svdquant import CalibrationStats, SVDQuantConfig, calibrate, quantize_
from diffusers_svdquant.calibration.blocks import (
    block_error,
    choose_block_smoothing,
    record_block_inputs,
    transformer_blocks,
)
from diffusers_svdquant.calibration.search import heldout_search, search_smoothing

BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]


@pytest.fixture(scope="module")
def flux():
    """(tiny FLUX float32, its inputs, calibration statistics with XᵀX)."""
    tiny = TINY_MODELS["flux"]
    torch.manual_seed(0)
    model = tiny.build().eval()
    inputs = tiny.inputs(torch.float32)
    stats = calibrate(model, run=lambda m: run(m, inputs), config=SVDQuantConfig(rank=8), progress=False, hessian=True)
    return model, inputs, stats


def test_transformer_blocks_are_the_outermost_repeated_blocks(flux):
    model, _, _ = flux
    assert transformer_blocks(model) == BLOCKS  # not attn.to_out (a list inside a block)
    assert transformer_blocks(nn.Sequential(nn.Linear(64, 64))) == []


def test_recorded_inputs_replay_the_block(flux):
    model, inputs, _ = flux
    calls = record_block_inputs(model, lambda m: run(m, inputs), BLOCKS, max_calls=1)
    assert [len(c) for c in calls.values()] == [1, 1, 1]
    args, kwargs = calls["transformer_blocks.0"][0]
    assert "temb" in kwargs or len(args) > 2  # the keyword inputs are kept
    assert not model.transformer_blocks[0]._forward_pre_hooks  # removed
    block = model.get_submodule("single_transformer_blocks.0")
    assert block_error(block, block, calls["single_transformer_blocks.0"]) == 0.0
    quantized = quantize_(copy.deepcopy(block), SVDQuantConfig(rank=8))
    assert 0 < block_error(block, quantized, calls["single_transformer_blocks.0"]) < 0.5

    def fails(m):
        m(**inputs, return_dict=False)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        record_block_inputs(model, fails, BLOCKS)
    assert not model.transformer_blocks[0]._forward_pre_hooks


@pytest.mark.parametrize("bad_first", [False, True])
def test_choose_block_smoothing_keeps_the_closer_block(flux, bad_first):
    model, inputs, stats = flux
    stats = copy.copy(stats)
    stats.smoothing = dict(stats.smoothing)
    calls = record_block_inputs(model, lambda m: run(m, inputs), BLOCKS, max_calls=1)
    names = list(stats.smoothing)
    # α = 1, β = 0: λ = the activation absmax, all of the outliers moved into the weight.
    alternatives = {"searched": dict(stats.smoothing), "extreme": dict.fromkeys(names, (1.0, 0.0))}
    if bad_first:
        alternatives = dict(reversed(alternatives.items()))
    errors = choose_block_smoothing(model, stats, SVDQuantConfig(rank=8), calls, alternatives)
    assert set(errors) == set(BLOCKS)
    for block, errs in errors.items():
        best = min(errs, key=errs.get)
        assert errs["searched"] != errs["extreme"]
        for name in names:
            if name.startswith(block + "."):
                assert stats.smoothing[name] == alternatives[best][name], (block, name)
    with pytest.raises(ValueError, match="smoothing_alpha overrides"):
        choose_block_smoothing(model, stats, SVDQuantConfig(rank=8, smoothing_alpha=0.5), calls, alternatives)


def _planted_layer_stats(seed: int) -> tuple[torch.Tensor, CalibrationStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 256, generator=g) / 16
    x = torch.randn(512, 256, generator=g)
    x[:, :6] *= 40  # outlier channels: smoothing pays
    stats = CalibrationStats(
        act_absmax={"l": x.abs().amax(0)},
        num_tokens={"l": 512},
        samples={"l": x[:128]},
        hessian={"l": x.t() @ x},
    )
    return w, stats


@pytest.mark.parametrize("gptq", [None, False])
def test_heldout_search_scores_the_final_quantization_on_held_out_rows(gptq):
    w, stats = _planted_layer_stats(0)
    result = heldout_search(w, stats, "l", SVDQuantConfig(rank=8, gptq=gptq))
    assert result.errors.shape == (12,) and result.alpha > 0
    assert result.error == float(result.errors.min()) < 0.5 * float(result.errors[0])  # (0, 0): no smoothing
    model = nn.Sequential()
    model.add_module("l", nn.Linear(256, 96, bias=False))
    model.l.weight.data = w
    search_smoothing(model, stats, SVDQuantConfig(rank=8, gptq=gptq), progress=False, score="held-out")
    assert stats.smoothing["l"] == (result.alpha, result.beta)
    with pytest.raises(ValueError, match="score must be"):
        search_smoothing(model, stats, score="best")
