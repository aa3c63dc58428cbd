"""The recorder's choice of calls for XᵀX (``hessian_rows_per_column``): how large a share, and which calls."""

from __future__ import annotations

import math

import pytest
import torch
from models import TINY_PIPELINE_KWARGS, build_pipeline

from diffusers_svdquant import calibrate
from diffusers_svdquant.calibration.recorder import DEFAULT_ROWS_PER_COLUMN, call_fraction, keeps_call

PROMPTS = ["a red bicycle", "a cat on a mat", "snowy mountains at dawn"]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(build_pipeline(tmp_path_factory.mktemp("recorder-pipe")))


@pytest.mark.parametrize(
    ("target", "k", "rows", "calls", "want"),
    [
        (None, 15360, 4608, 1024, 1.0),  # every call
        (64, 15360, 4608, 1024, 64 * 15360 / (4608 * 1024)),  # FLUX.1's single-block proj_out: about a fifth
        (64, 3072, 4608, 1024, 64 * 3072 / (4608 * 1024)),  # its K = 3,072 layers: about one call in 24
        (64, 12288, 512, 1024, 1.0),  # the text MLP's output: 42.7 rows per column offered, all kept
        (64, 3072, 1, 1024, 1.0),  # AdaLN: one row per call
        (2, 128, 256, 8, 0.125),
        (2, 128, 32, 8, 1.0),  # exactly the target: all
    ],
)
def test_call_fraction(target, k, rows, calls, want):
    assert call_fraction(target, k, rows, calls) == pytest.approx(want)


def test_default_rows_per_column():
    assert DEFAULT_ROWS_PER_COLUMN == 64


@pytest.mark.parametrize("fraction", [0.05, 0.21, 0.5, 0.9])
def test_keeps_call_keeps_about_the_fraction_at_every_step(fraction):
    """Over 256 prompts x 8 steps the kept share is the fraction within 5 binomial sigmas, at every step alike (a
    stride would alias with the step count), and the draw is a function of its arguments alone."""
    prompts, steps = 256, 8
    kept = [[keeps_call(0, 3072, 4608, i, s, fraction) for i in range(prompts)] for s in range(steps)]
    total = sum(map(sum, kept))
    n = prompts * steps
    assert abs(total - fraction * n) < 5 * math.sqrt(n * fraction * (1 - fraction))
    for s in range(steps):
        assert abs(sum(kept[s]) - fraction * prompts) < 5 * math.sqrt(prompts * fraction * (1 - fraction)), s
    again = [[keeps_call(0, 3072, 4608, i, s, fraction) for i in range(prompts)] for s in range(steps)]
    assert again == kept


def test_keeps_call_depends_on_every_argument():
    """Another seed, K, row count, item or call draws anew (about half of 512 differ at fraction 0.5); fraction 1
    keeps every call."""
    base = [keeps_call(0, 3072, 4608, i, 0, 0.5) for i in range(512)]
    for other in (
        [keeps_call(1, 3072, 4608, i, 0, 0.5) for i in range(512)],
        [keeps_call(0, 12288, 4608, i, 0, 0.5) for i in range(512)],
        [keeps_call(0, 3072, 4096, i, 0, 0.5) for i in range(512)],
        [keeps_call(0, 3072, 4608, i, 1, 0.5) for i in range(512)],
        [keeps_call(0, 3072, 4608, i + 512, 0, 0.5) for i in range(512)],
    ):
        differ = sum(a != b for a, b in zip(base, other, strict=True))
        assert 200 < differ < 312, differ
    assert all(keeps_call(0, 3072, 4608, i, 0, 1.0) for i in range(100))
    assert not any(keeps_call(0, 3072, 4608, i, c, 0.0) for i in range(1, 100) for c in range(3))
    assert not any(keeps_call(0, 3072, 4608, 0, c, 0.0) for c in range(1, 100))


@pytest.mark.parametrize("seed", range(4))
def test_keeps_call_never_leaves_a_sum_empty(seed):
    """Item 0's first call is always kept, whatever the share: the sum has rows (one call offers at least the rows
    asked for when the share is under one call)."""
    assert keeps_call(seed, 3072, 4608, 0, 0, 1e-9)


@pytest.mark.parametrize("per_call", [False, True])
def test_hessian_rows_per_column_sums_the_kept_calls_alone(tiny_pipe, per_call, monkeypatch):
    """hessian_rows_per_column=2 (fixed point, per prompt or each call added at once as on a GPU): each layer's XᵀX
    is the sum over the calls keeps_call keeps, at the share call_fraction gives for its K and rows; the rows it
    summed are in hessian_rows (GPTQ's damping reads them); q / k / v still hold one sum; 2 passes give the same
    bits; the summary says so."""
    from diffusers_svdquant.apps.calibration_commands import _summary
    from diffusers_svdquant.calibration import recorder

    monkeypatch.setattr(recorder, "FIXED_PER_CALL", per_call)

    prompts = [*PROMPTS, "a lighthouse in fog"]
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        tiny_pipe.transformer.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1]).double().clone())
        )
        for n in names
    ]
    kw = {"prompts": prompts, "num_inference_steps": 3, "pipeline_kwargs": TINY_PIPELINE_KWARGS, "search": False,
          "progress": False, "hessian": True, "hessian_rows_per_column": 2, "seed": 3}  # fmt: skip
    try:
        one = calibrate(tiny_pipe, **kw)
        seen = {n: r[1:] for n, r in rows.items()}  # after the probe's first forward
        two = calibrate(tiny_pipe, **kw, hessian_passes=2)
    finally:
        for h in handles:
            h.remove()
    assert one.info["hessian_sum"] == "fixed" and one.info["hessian_rows_per_column"] == 2
    assert one.info["hessian_per_call"] == per_call
    for name in names:
        calls = seen[name]
        assert len(calls) == 4 * 3
        k, m = calls[0].shape[1], calls[0].shape[0]
        fraction = call_fraction(2, k, m, 4 * 3)
        assert 0 < fraction < 1
        kept = [i for i in range(12) if keeps_call(3, k, m, i // 3, i % 3, fraction)]
        assert 0 < len(kept) < 12, (name, kept)  # this seed drops some calls and keeps some
        want = sum(calls[i].t() @ calls[i] for i in kept).float()
        for stats in (one, two):
            got = stats.hessian_for(name)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.diagonal().max()))
            assert torch.equal(got, one.hessian_for(name))
            assert stats.hessian_rows[name] == len(kept) * m and stats.xtx_rows(name) == len(kept) * m
        assert one.num_tokens[name] == 12 * m
    shared = one.hessian_shared()
    attn = "transformer_blocks.0.attn."
    assert shared.get(attn + "to_v") in (attn + "to_q", attn + "to_k")  # one sum for q / k / v still
    assert "calls kept for about 2 rows per input column" in _summary(one, 1.0)


def test_hessian_rows_per_column_auto_keeps_every_call_where_the_calls_offer_few_rows(tiny_pipe):
    """The default ("auto": 64 rows per column with fixed point) keeps every call of a model whose calls offer
    fewer: the same bits as None; with the tree, every call too (recorded as None)."""
    kw = {"prompts": PROMPTS, "num_inference_steps": 2, "pipeline_kwargs": TINY_PIPELINE_KWARGS, "search": False,
          "progress": False, "hessian": True}  # fmt: skip
    auto = calibrate(tiny_pipe, **kw, hessian_sum="fixed")
    every = calibrate(tiny_pipe, **kw, hessian_sum="fixed", hessian_rows_per_column=None)
    tree = calibrate(tiny_pipe, **kw, hessian_sum="tree")
    assert auto.info["hessian_rows_per_column"] == 64 and every.info["hessian_rows_per_column"] is None
    assert tree.info["hessian_rows_per_column"] is None
    for name in auto.hessian_names():
        assert torch.equal(auto.hessian_for(name), every.hessian_for(name))
        assert auto.hessian_rows[name] == auto.num_tokens[name] == tree.hessian_rows[name]


def test_hessian_rows_per_column_bad_arguments(tiny_pipe):
    kw = {"prompts": PROMPTS, "num_inference_steps": 1, "pipeline_kwargs": TINY_PIPELINE_KWARGS, "search": False,
          "progress": False}  # fmt: skip
    for bad in (0, -3, True, 2.5, "all"):
        with pytest.raises(ValueError, match="hessian_rows_per_column must be 'auto', None or an integer >= 1"):
            calibrate(tiny_pipe, **kw, hessian=True, hessian_rows_per_column=bad)
    with pytest.raises(ValueError, match="hessian_rows_per_column needs fixed-point sums"):
        calibrate(tiny_pipe, **kw, hessian=True, hessian_sum="tree", hessian_rows_per_column=8)
    with pytest.raises(ValueError, match="need hessian=True"):
        calibrate(tiny_pipe, **kw, hessian_rows_per_column=8)
    with pytest.raises(ValueError, match="hessian_rows_per_column is for a pipeline's steps"):
        calibrate(tiny_pipe.transformer, run=lambda m: None, hessian=True, hessian_rows_per_column=8)
