"""Layers that read the very same input tensor hold one XᵀX (calibration.hessian.SharedMoments), always with the
bits each layer has on its own."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

from diffusers_svdquant import CalibrationStats, calibrate
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


def test_statistics_without_shared_sums_stay_version_2_and_bad_aliases_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    stats = calibrate(model, run=lambda m: m(x), search=False, progress=False, hessian=True)
    stats.save(tmp_path / "s.safetensors")
    with safe_open(tmp_path / "s.safetensors", framework="pt") as f:
        assert f.metadata()["format_version"] == "2" and "hessian_aliases" not in f.metadata()
    stats.hessian["2"] = stats.hessian["0"]  # one tensor for two layers: stored once
    stats.save(tmp_path / "t.safetensors")
    back = CalibrationStats.load(tmp_path / "t.safetensors")
    assert back.hessian_alias == {"2": "0"} and torch.equal(back.hessian_for("2"), stats.hessian["0"])
    from safetensors.torch import save_file

    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, tmp_path / "bad.safetensors", meta | {"hessian_aliases": '{"2": "gone"}'})
    with pytest.raises(ValueError, match="hessian_aliases names XᵀX the file does not hold"):
        CalibrationStats.load(tmp_path / "bad.safetensors")
