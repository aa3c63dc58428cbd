"""XᵀX gathered in several passes (calibration.passes, calibration.tensorfile): the plan of passes, the same bits
as one pass, the shards on disk, the streamed statistics file, and quantize-on-load reading them."""

from __future__ import annotations

import copy
import gc
import os
import random

import pytest
import torch
from models import TINY_MODELS, run
from safetensors import safe_open
from torch import nn

from diffusers_svdquant import CalibrationStats, SVDQuantConfig, calibrate, quantize_
from diffusers_svdquant.calibration.passes import GIB, auto_sum, plan_passes, tree_copies
from diffusers_svdquant.calibration.tensorfile import write_tensors


def _sizes(seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(f"l{i}", rng.choice([0, 1, 64, 4096, rng.randint(0, 10_000)])) for i in range(rng.randint(1, 14))]


@pytest.mark.parametrize("seed", range(40))
def test_plan_passes_keeps_every_layer_once_in_order(seed):
    sizes = _sizes(seed)
    names = [n for n, _ in sizes]
    passes = random.Random(seed).randint(1, 16)
    groups = plan_passes(sizes, passes=passes)
    assert len(groups) == min(passes, len(sizes)) and all(groups)
    assert [n for g in groups for n in g] == names
    budget = max(s for _, s in sizes) + random.Random(seed).randint(1, 8000)
    groups = plan_passes(sizes, budget_bytes=budget)
    assert [n for g in groups for n in g] == names
    held = dict(sizes)
    assert all(sum(held[n] for n in g) <= budget for g in groups)
    # Greedy: no group could have taken the next group's first layer.
    assert all(sum(held[n] for n in a) + held[b[0]] > budget for a, b in zip(groups, groups[1:], strict=False))


def test_plan_passes_balances_bytes_and_refuses_bad_input():
    assert plan_passes([("a", 10), ("b", 10), ("c", 10), ("d", 30)], passes=2) == [["a", "b", "c"], ["d"]]
    assert plan_passes([("a", 1)] * 0, passes=3) == []
    assert plan_passes([("a", 5), ("b", 5)]) == [["a", "b"]]
    with pytest.raises(ValueError, match="alone needs .* more than hessian_budget_gib"):
        plan_passes([("a", 5), ("big", 2 * GIB)], budget_bytes=GIB)
    with pytest.raises(ValueError, match="not both"):
        plan_passes([("a", 5)], passes=2, budget_bytes=GIB)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="hessian_passes must be an integer >= 1"):
            plan_passes([("a", 5)], passes=bad)
    with pytest.raises(ValueError, match="hessian_budget_gib must be > 0"):
        plan_passes([("a", 5)], budget_bytes=0)


@pytest.mark.parametrize("seed", range(40))
def test_plan_passes_counts_a_shared_sum_once_and_keeps_its_layers_together(seed):
    """Layers that hold one sum (``together``: layer → its set's first layer, as calibrate finds them) count once
    and land in one pass, placed where their first layer in module order stands; every layer in exactly one."""
    rng = random.Random(seed)
    sizes = _sizes(seed)
    names = [n for n, _ in sizes]
    together = {}
    for name in names:  # a layer joins an earlier one's set now and then, taking its size (the same K)
        if rng.random() < 0.4 and name != names[0]:
            first = rng.choice(names[: names.index(name)])
            together[name] = together.get(first, first)
    alone = dict(sizes)
    sizes = [(n, alone[together.get(n, n)]) for n in names]
    size = dict(sizes)
    sets = {n: together.get(n, n) for n in names}
    once = sum(s for n, s in sizes if n not in together)
    passes = rng.randint(1, 16)
    budget = max(s for _, s in sizes) + rng.randint(1, 8000)
    for groups in (plan_passes(sizes, passes=passes, together=together),
                   plan_passes(sizes, budget_bytes=budget, together=together)):  # fmt: skip
        assert sorted(n for g in groups for n in g) == sorted(names) and all(groups)
        assert all(g == sorted(g, key=names.index) for g in groups)
        for first in set(sets.values()):  # each set in one pass
            assert sum(any(sets[n] == first for n in g) for g in groups) == 1, first
    groups = plan_passes(sizes, budget_bytes=budget, together=together)
    held = [sum(size[n] for n in g if n not in together) for g in groups]
    assert all(h <= budget for h in held) and sum(held) == once


def test_plan_passes_places_a_shared_sum_where_its_first_layer_stands():
    # Counted once: three 10-byte layers of one set fit a 10-byte budget.
    assert plan_passes([("q", 10), ("k", 10), ("v", 10)], budget_bytes=10, together={"k": "q", "v": "q"}) == [
        ["q", "k", "v"]
    ]
    # A FLUX single block: proj_mlp and the attention's q / k / v read one tensor, proj_out stands between them.
    block = [("mlp", 10), ("out", 10), ("q", 10), ("k", 10)]
    assert plan_passes(block, passes=2, together={"q": "mlp", "k": "mlp"}) == [["mlp", "q", "k"], ["out"]]
    assert plan_passes(block, passes=2) == [["mlp", "out"], ["q", "k"]]


@pytest.mark.parametrize(
    ("items", "copies"),
    [
        (range(1), 1),
        (range(2), 2),
        (range(4), 3),
        (range(8), 4),
        (range(128), 8),
        (range(3, 8), 4),
        (range(64, 128), 7),
    ],
)
def test_tree_copies_counts_the_partial_sums_a_process_holds(items, copies):
    assert tree_copies(list(items)) == copies


def _model_and_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 192))
    x = torch.randn(3, 7, 64)
    return model, lambda m: (m(x[:2]), m(x[2:]))


@pytest.mark.parametrize("plan", [{"hessian_passes": 2}, {"hessian_passes": 5}, {"hessian_budget_gib": 83e3 / GIB}])
def test_passes_give_the_bits_of_one_pass(plan, tmp_path):
    model, go = _model_and_run()
    one = calibrate(model, run=go, progress=False, hessian=True)
    many = calibrate(model, run=go, progress=False, hessian=True, **plan)
    assert many.info["hessian_passes"] == min(plan.get("hessian_passes", 2), 3) and not many.hessian
    assert many.hessian_names() == one.hessian_names() == ["0", "2", "3"]
    shards = sorted({os.path.basename(f) for f in many.hessian_files.values()})
    assert shards == [f"hessian-{i:05d}.safetensors" for i in range(many.info["hessian_passes"])]
    for name in one.hessian_names():
        assert torch.equal(many.hessian_for(name), one.hessian_for(name)), name
    # The first pass's statistics and the search are those of one pass.
    for name in one.act_absmax:
        assert torch.equal(many.act_absmax[name], one.act_absmax[name])
        assert torch.equal(many.samples[name], one.samples[name])
    assert many.smoothing == one.smoothing and many.num_tokens == one.num_tokens
    # The file streamed from the shards reads back as the sums.
    many.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    for name in one.hessian_names():
        assert torch.equal(back.hessian_for(name), one.hessian_for(name)), name
    # A temporary shard folder goes with the last of the statistics (and their copies) that read it.
    folder = os.path.dirname(many.hessian_files["0"])
    kept = copy.copy(many)
    del many
    gc.collect()
    assert torch.equal(kept.hessian_for("0"), one.hessian_for("0"))
    del kept
    gc.collect()
    assert not os.path.exists(folder)


@pytest.mark.parametrize("per_call", [False, True])
def test_fixed_point_sums_are_the_same_bits_in_any_passes_and_close_to_the_tree(per_call, monkeypatch):
    """hessian_sum="fixed": units from the probe (the first forward), XᵀX from the statistics pass on; the same bits
    for any pass count, within float32 rounding of the tree's sums, the statistics themselves unchanged. Planned at
    12·K² bytes a layer, or 8·K² adding each call at once (what a model on a GPU does)."""
    from diffusers_svdquant.calibration import recorder

    monkeypatch.setattr(recorder, "FIXED_PER_CALL", per_call)
    model, go = _model_and_run()
    kw = {"run": go, "progress": False, "search": False, "hessian": True}
    tree, one = calibrate(model, **kw), calibrate(model, **kw, hessian_sum="fixed")
    three = calibrate(model, **kw, hessian_sum="fixed", hessian_passes=3)
    budget = calibrate(model, **kw, hessian_sum="fixed", hessian_budget_gib=(170e3 if per_call else 250e3) / GIB)
    assert (tree.info["hessian_sum"], one.info["hessian_sum"]) == ("tree", "fixed")
    # (8 or 12)·(64² + 128² + 64²) bytes (packed, one block each) in 2 passes at 170e3 / 250e3 bytes
    assert (one.info["hessian_passes"], three.info["hessian_passes"], budget.info["hessian_passes"]) == (1, 3, 2)
    assert one.info["hessian_per_call"] == per_call
    assert one.info["hessian_retried"] == three.info["hessian_retried"] == [] and "hessian_retried" not in tree.info
    # The probe is the first of the run's two calls: the sums used about one doubling of the 2^35 room.
    assert 32 < one.info["hessian_headroom_bits"] == three.info["hessian_headroom_bits"] <= 35
    assert one.hessian_names() == three.hessian_names() == tree.hessian_names() == ["0", "2", "3"]
    for name in tree.hessian_names():
        assert torch.equal(three.hessian_for(name), one.hessian_for(name)), name
        assert torch.equal(budget.hessian_for(name), one.hessian_for(name)), name
        scale = tree.hessian_for(name).diagonal().max()
        torch.testing.assert_close(one.hessian_for(name), tree.hessian_for(name), rtol=1e-5, atol=1e-6 * scale)
    for name in tree.act_absmax:
        assert torch.equal(one.act_absmax[name], tree.act_absmax[name])
    assert one.num_tokens == tree.num_tokens
    with pytest.raises(ValueError, match="hessian_sum must be 'auto', 'tree' or 'fixed', got 'exact'"):
        calibrate(model, **kw, hessian_sum="exact")


def _growing(scales: list[float]):
    """A run whose r-th call (the probe's first forward is call 0) feeds inputs ``scales[r]`` times larger, to a model
    whose tanh keeps the later layers' inputs within [-1, 1]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Linear(64, 192))
    x, runs = torch.randn(3, 7, 64), []

    def go(m: nn.Module) -> None:
        scale = scales[min(len(runs), len(scales) - 1)]
        runs.append(1)
        m(x[:2])
        m(x[2:] * scale)

    return model, go, runs


@pytest.mark.parametrize("per_call", [False, True])
@pytest.mark.parametrize("plan", [{}, {"hessian_passes": 2}, {"hessian_budget_gib": 250e3 / GIB}])
def test_a_layer_that_outgrows_its_probe_is_recorded_again_in_units_from_the_statistics(plan, per_call, monkeypatch):
    """The probe (the first forward: the run's first call) sees x; the rest of the run 2^19 x (2^38 times the energy,
    past the 2^35 the probe's units hold): the first layer is recorded again after the planned passes, in units from
    the statistics, and its sum is the tree's within float32 rounding. The layers after the tanh keep their probe's."""
    from diffusers_svdquant.calibration import recorder

    monkeypatch.setattr(recorder, "FIXED_PER_CALL", per_call)
    model, go, runs = _growing([2.0**19])
    kw = {"run": go, "progress": False, "search": False, "hessian": True}
    tree = calibrate(model, **kw)
    runs.clear()
    fixed = calibrate(model, **kw, hessian_sum="fixed", **plan)
    planned = 1 if not plan or (per_call and "hessian_budget_gib" in plan) else 2  # 8 B per entry: 1 group
    assert fixed.info["hessian_retried"] == ["0"]
    assert fixed.info["hessian_passes"] == planned + 1 and len(runs) == 1 + planned + 1  # probe, passes, retry
    assert fixed.hessian_names() == tree.hessian_names() == ["0", "2", "3"]
    for name in tree.hessian_names():
        want = tree.hessian_for(name)
        torch.testing.assert_close(fixed.hessian_for(name), want, rtol=1e-5, atol=1e-6 * want.diagonal().max())
    # Any pass plan gives the same bits: the retry is decided by the totals.
    same = calibrate(model, **kw, hessian_sum="fixed", hessian_passes=3)
    assert same.info["hessian_retried"] == ["0"]
    for name in tree.hessian_names():
        assert torch.equal(same.hessian_for(name), fixed.hessian_for(name)), name


@pytest.mark.parametrize("items", [1, 7, 8, 128])
def test_auto_sum_takes_fixed_point_when_it_holds_less(items):
    """The tree holds up to tree_copies float32 sums per layer, fixed point 12 bytes per entry: fixed from 4 copies."""
    assert auto_sum(items) == ("fixed" if tree_copies(range(items)) > 3 else "tree")
    assert (auto_sum(7), auto_sum(8)) == ("tree", "fixed")


def test_calibrate_runs_what_auto_chooses(monkeypatch):
    """calibrate's default hessian_sum="auto" runs the sum auto_sum picks, from the total item count."""
    from diffusers_svdquant.calibration import recording

    model, go = _model_and_run()
    seen = []

    def pick(total_items, per_call):
        seen.append((total_items, per_call))
        return "fixed"

    monkeypatch.setattr(recording, "auto_sum", pick)
    stats = calibrate(model, run=go, progress=False, search=False, hessian=True, hessian_budget_gib=1.0)
    assert stats.info["hessian_sum"] == "fixed" and seen == [(1, False)] and not stats.info["hessian_per_call"]
    assert (
        calibrate(model, run=go, progress=False, search=False, hessian=True, hessian_sum="tree").info["hessian_sum"]
        == "tree"
        and len(seen) == 1
    )


def test_on_a_gpu_a_budget_that_holds_the_prompt_in_progress_adds_per_prompt(monkeypatch):
    """With the model on a GPU fixed point adds per call (8 bytes per packed entry), unless a budget holds the float32
    sum of the prompt in progress too (12 bytes) in as few passes: then per prompt, converting a step count times
    less often. FIXED_PER_CALL=True keeps per call; no budget keeps the smaller per call."""
    from diffusers_svdquant.calibration import recorder, recording

    monkeypatch.setattr(recording, "fixed_per_call", lambda model: True)  # as if the model were on a GPU
    model, go = _model_and_run()
    kw = {"run": go, "progress": False, "search": False, "hessian": True, "hessian_sum": "fixed"}
    # 8 or 12 x (64² + 128² + 64²) bytes: 196,608 per call, 294,912 per prompt.
    roomy = calibrate(model, **kw, hessian_budget_gib=300e3 / GIB)
    tight = calibrate(model, **kw, hessian_budget_gib=200e3 / GIB)
    unbounded = calibrate(model, **kw)
    assert (roomy.info["hessian_per_call"], roomy.info["hessian_passes"]) == (False, 1)
    assert (tight.info["hessian_per_call"], tight.info["hessian_passes"]) == (True, 1)  # per prompt: 2 passes
    assert unbounded.info["hessian_per_call"]
    for name in roomy.hessian_names():  # each call rounded to units, or each prompt: float32 rounding apart
        want = tight.hessian_for(name)
        torch.testing.assert_close(roomy.hessian_for(name), want, rtol=1e-5, atol=1e-6 * want.diagonal().max())
    monkeypatch.setattr(recorder, "FIXED_PER_CALL", True)
    assert calibrate(model, **kw, hessian_budget_gib=300e3 / GIB).info["hessian_per_call"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_model_on_a_gpu_adds_each_call_in_fixed_point():
    """On a GPU fixed point adds each call's sums at once (8 bytes per packed entry, no item in progress): within
    float32 rounding of the tree, the same bits for any pass count."""
    model, _ = _model_and_run()
    model = model.cuda()
    x = torch.randn(3, 7, 64, device="cuda")

    def go(m):
        m(x[:2])
        m(x[2:])

    kw = {"run": go, "progress": False, "search": False, "hessian": True}
    tree, one = calibrate(model, **kw), calibrate(model, **kw, hessian_sum="fixed")
    three = calibrate(model, **kw, hessian_sum="fixed", hessian_passes=3)
    assert one.info["hessian_per_call"] and one.info["hessian_retried"] == []
    for name in tree.hessian_names():
        want = tree.hessian_for(name)
        assert torch.equal(three.hessian_for(name), one.hessian_for(name)), name
        torch.testing.assert_close(one.hessian_for(name), want, rtol=1e-5, atol=1e-6 * want.diagonal().max())


def test_fixed_point_sums_refuse_inputs_beyond_their_statistics():
    """A run whose inputs outgrow the probe (so the layer is recorded again in units from the statistics) and then
    grow again between the statistics pass and that pass: an error naming the layer, never a wrapped-around sum."""
    model, go, _ = _growing([1.0, 2.0**19, 2.0**19 * 100])
    with pytest.raises(ValueError, match=r"FixedPointSum\('0'\): item 0's XᵀX exceeds rows · absmax²"):
        calibrate(model, run=go, progress=False, search=False, hessian=True, hessian_sum="fixed")


def test_hessian_dir_keeps_the_shards_and_passes_need_hessian(tmp_path):
    model, go = _model_and_run()
    stats = calibrate(model, run=go, search=False, progress=False, hessian=True, hessian_dir=tmp_path / "xtx")
    assert stats.info["hessian_passes"] == 1 and set(stats.hessian_files.values()) == {
        str(tmp_path / "xtx" / "hessian-00000.safetensors")
    }
    del stats
    gc.collect()
    assert (tmp_path / "xtx" / "hessian-00000.safetensors").is_file()
    for kw in ({"hessian_passes": 2}, {"hessian_budget_gib": 1.0}, {"hessian_dir": tmp_path}, {"hessian_sum": "fixed"}):
        with pytest.raises(ValueError, match="need hessian=True"):
            calibrate(model, run=go, search=False, progress=False, **kw)
    with pytest.raises(ValueError, match="hessian_budget_gib must be a number"):
        calibrate(model, run=go, search=False, progress=False, hessian=True, hessian_budget_gib="1")


def test_quantize_on_load_reads_the_shards():
    tiny = TINY_MODELS["flux"]
    torch.manual_seed(0)
    model = tiny.build().to(torch.bfloat16)
    inputs = tiny.inputs(torch.bfloat16)
    kw = {"run": lambda m: run(m, inputs), "progress": False, "hessian": True}
    one, three = calibrate(model, **kw), calibrate(model, **kw, hessian_passes=3)
    assert three.info["hessian_passes"] == 3
    q1 = quantize_(copy.deepcopy(model), SVDQuantConfig(rank=8, calibration=one))
    q3 = quantize_(copy.deepcopy(model), SVDQuantConfig(rank=8, calibration=three))
    for (n1, t1), (n3, t3) in zip(q1.state_dict().items(), q3.state_dict().items(), strict=True):
        assert n1 == n3 and torch.equal(t1, t3), n1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64])
def test_write_tensors_is_a_safetensors_file(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(i + 1, 3, generator=g) * 100).to(dtype) for i in range(3)}
    tensors["scalarish"] = torch.ones(1, dtype=dtype)
    reads = []

    def read(name: str) -> torch.Tensor:
        reads.append(name)
        return tensors[name]

    shapes = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_tensors(str(tmp_path / "f.safetensors"), shapes, read, {"format": "x"})
    assert reads == sorted(tensors)
    with safe_open(tmp_path / "f.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "x"} and set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    with pytest.raises(ValueError, match="announced"):
        write_tensors(str(tmp_path / "g.safetensors"), shapes | {"t0": (dtype, (2, 3))}, read, {})
