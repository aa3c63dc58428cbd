"""The recorder's choice of calls for XᵀX (``hessian_rows_per_column``): how large a share, and which calls."""

from __future__ import annotations

import math

import pytest

from diffusers_svdquant.calibration.recorder import DEFAULT_ROWS_PER_COLUMN, call_fraction, keeps_call


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
