"""Layers that read the very same input tensor hold one XᵀX (calibration.hessian.SharedMoments), always with the
bits each layer has on its own."""

from __future__ import annotations

import random

import pytest
import torch

from diffusers_svdquant.calibration.hessian import PairwiseSum, SharedMoments, share_labels, shared_units


@pytest.mark.parametrize("seed", range(30))
def test_shared_moments_match_one_sum_per_layer_over_random_calls_and_items(seed):
    """Random calls of 4 layers on a few tensors (some changed in place, some calls with no rows) over several
    items: sharing gives every layer the bits of its own sum, item tree included."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    names = ["w", "x", "y", "z"]
    shared, alone = SharedMoments(), SharedMoments(share=False)
    for item in range(rng.randint(1, 6)):
        pool = [torch.randn(rng.choice([0, 5, 130, 260]), 32, generator=g) for _ in range(3)]
        for _ in range(rng.randint(0, 12)):
            t = rng.choice(pool)
            if rng.random() < 0.1:
                t.add_(1)
            # A layer often follows another on the same tensor, as q/k/v do.
            for name in rng.sample(names, rng.randint(1, 4)) if rng.random() < 0.7 else [rng.choice(names)]:
                if t.shape[0]:  # the recorder skips calls without rows
                    shared.add(name, t, t)
                    alone.add(name, t, t)
        shared.finish_item(item)
        alone.finish_item(item)
    a, b = shared.moments(), alone.moments()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].total(), b[name].total()), name


def test_shared_units_merge_once_only_what_every_process_shares():
    one, two = PairwiseSum(), PairwiseSum()
    rank0 = {"q": one, "k": one, "v": one, "o": two}
    other, lone = PairwiseSum(), PairwiseSum()
    rank1 = {"q": other, "k": other, "v": lone}  # v left the set on this process, o never ran here
    labels = [share_labels(rank0), share_labels(rank1)]
    assert shared_units(["q", "k", "v", "o", "never"], labels) == [["q", "k"], ["v"], ["o"]]
