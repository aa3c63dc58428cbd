"""Layers that read the very same input tensor hold one XᵀX (calibration.hessian.SharedMoments): found while
recording, held once in memory, in the pass plan and on disk, and always the bits each layer has on its own."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from models import TINY_MODELS, TINY_PIPELINE_KWARGS, build_pipeline, run
from safetensors import safe_open
from torch import nn

from diffusers_svdquant import CalibrationStats, calibrate
from diffusers_svdquant.calibration import recorder
from diffusers_svdquant.calibration.fixedpoint import FixedPointSum
from diffusers_svdquant.calibration.hessian import PairwiseSum, SharedMoments, share_labels, shared_units
from diffusers_svdquant.calibration.packed import packed_size, unpack_moment

FLUX_SETS = [  # the tiny FLUX's layers that read one tensor: 1 double block, 2 single blocks
    {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"},
    {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
     "transformer_blocks.0.attn.add_v_proj"},
    *({f"single_transformer_blocks.{i}.proj_mlp", *(f"single_transformer_blocks.{i}.attn.to_{c}" for c in "qkv")}
      for i in range(2)),
]  # fmt: skip


def _sets(stats: CalibrationStats) -> list[set[str]]:
    """The sets of layers that hold one XᵀX."""
    sets: dict[str, set[str]] = {}
    for name, first in stats.hessian_shared().items():
        sets.setdefault(first, {first}).add(name)
    return sorted(sets.values(), key=sorted)


def _same_bits(a: CalibrationStats, b: CalibrationStats) -> None:
    assert a.hessian_names() == b.hessian_names() and a.hessian_names()
    for name in a.hessian_names():
        assert torch.equal(a.hessian_for(name), b.hessian_for(name)), name


def _calibrate(monkeypatch, share: bool, *args, **kwargs) -> CalibrationStats:
    monkeypatch.setattr(recorder, "SHARE_INPUTS", share)
    return calibrate(*args, progress=False, hessian=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_flux():
    tiny = TINY_MODELS["flux"]
    torch.manual_seed(0)
    model = tiny.build()
    inputs = tiny.inputs(torch.float32)
    return model, lambda m: (run(m, inputs), run(m, inputs))


def test_flux_attention_inputs_share_one_sum_with_the_bits_of_one_each(tiny_flux, monkeypatch):
    model, go = tiny_flux
    alone = _calibrate(monkeypatch, False, model, run=go, search=False)
    shared = _calibrate(monkeypatch, True, model, run=go, search=False)
    assert _sets(alone) == [] and _sets(shared) == sorted(FLUX_SETS, key=sorted)
    _same_bits(shared, alone)
    # Held once: the layers of a set map to one tensor.
    for names in FLUX_SETS:
        assert len({id(shared.hessian[n]) for n in names}) == 1
    assert shared.num_tokens == alone.num_tokens and shared.act_absmax.keys() == alone.act_absmax.keys()


class _Diverging(nn.Module):
    """``a``, ``b``, ``c`` read ``x`` one after the other, unless a call's ``mode`` says otherwise; ``d`` is the odd
    one out (it reads ``b``'s output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.d = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, mode: str = "same") -> torch.Tensor:
        out = self.a(x)
        if mode == "a-only":  # b and c do not read this call: they leave a's sum together
            return out
        if mode == "inplace":  # the same object, changed in place between a and b: not the same input
            x.mul_(2)
        y = self.b(x + 1 if mode == "b-other" else x.view(x.shape) if mode == "b-view" else x)
        z = self.c(torch.flip(x, [0]) if mode == "c-other" else x)
        return self.d(out + y + z)


@pytest.mark.parametrize(
    ("modes", "sets"),
    [
        (["same", "same", "same"], [{"a", "b", "c"}]),
        (["same", "c-other", "same"], [{"a", "b"}]),  # c shares call 1 only: its own sum from call 2 on
        (["same", "b-other", "same"], []),  # c follows b (on another input) in call 2: each leaves a's sum
        (["same", "a-only", "same"], [{"b", "c"}]),  # b and c leave a together, then read the same as each other
        (["same", "inplace", "same"], [{"b", "c"}]),  # changed after a read it: b and c leave, c follows b
        (["same", "b-view", "same"], []),  # a view is another object: b computes its own
        (["c-other", "same", "same"], [{"a", "b"}]),  # c never read a's input: it never joins
    ],
)
def test_layers_that_stop_reading_the_same_input_keep_the_bits_of_their_own_sums(monkeypatch, modes, sets):
    """Two or three layers read one tensor in some calls and not in others: each still gets exactly the sum it
    would have alone (XᵀX in 128-row chunks: 300 rows per call, so a chunk boundary falls mid-call)."""
    model = _Diverging()
    xs = [torch.randn(3, 100, 64, generator=torch.Generator().manual_seed(i)) for i in range(len(modes))]

    def go(m: nn.Module) -> None:
        for x, mode in zip(xs, modes, strict=True):
            m(x.clone(), mode)

    alone = _calibrate(monkeypatch, False, model, run=go, search=False)
    shared = _calibrate(monkeypatch, True, model, run=go, search=False)
    assert _sets(shared) == sets
    _same_bits(shared, alone)
    # In int64 fixed point too, where a layer shares only a sum in its own units (sized from its own statistics).
    fixed = {"search": False, "hessian_sum": "fixed"}
    _same_bits(
        _calibrate(monkeypatch, True, model, run=go, **fixed), _calibrate(monkeypatch, False, model, run=go, **fixed)
    )


def test_fixed_point_sums_are_shared_only_in_the_same_units(monkeypatch):
    """hessian_sum="fixed" sizes each layer's integer units from its own probe (here the whole run: it never calls the
    model as a whole): b, which reads a's input in call 1 and 10x larger ones after, must not share a's sum."""
    model = _Diverging()
    xs = [torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def go(m: nn.Module) -> None:
        for i, x in enumerate(xs):
            m.a(x)
            m.b(x if i == 0 else 10 * x)

    fixed = {"search": False, "hessian_sum": "fixed"}
    shared = _calibrate(monkeypatch, True, model, run=go, **fixed)
    _same_bits(shared, _calibrate(monkeypatch, False, model, run=go, **fixed))
    assert _sets(shared) == []
    # Same inputs throughout: the same units, one sum.
    same = _calibrate(monkeypatch, True, model, run=lambda m: [(m.a(x), m.b(x)) for x in xs], **fixed)
    assert _sets(same) == [{"a", "b"}]


def test_inference_mode_inputs_are_never_shared(monkeypatch):
    """An inference-mode tensor has no version counter, so an in-place change could not be seen: no sharing, and
    the bits of one sum each."""
    model = _Diverging()
    x = torch.randn(3, 100, 64)

    def go(m: nn.Module) -> None:
        with torch.inference_mode():
            m(x.clone())

    shared = _calibrate(monkeypatch, True, model, run=go, search=False)
    assert _sets(shared) == []
    _same_bits(shared, _calibrate(monkeypatch, False, model, run=go, search=False))


@pytest.mark.parametrize("sums", ["tree", "fixed", "fixed per call"])
@pytest.mark.parametrize("seed", range(30))
def test_shared_moments_match_one_sum_per_layer_over_random_calls_and_items(seed, sums):
    """Random calls of 4 layers on a few tensors (some changed in place, some calls with no rows) over several
    items: sharing gives every layer the bits of its own sum, item tree included; in fixed point too, each item's
    sum converted once or each call's at once (per_call, where a layer that leaves keeps a copy of the integers)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    names = ["w", "x", "y", "z"]
    kw = {}
    if sums != "tree":
        energy = torch.full((32,), 40.0)  # about one 40-row call's: the units the layers share
        kw = {"new_sum": lambda name: FixedPointSum.from_probe(energy, name), "per_call": sums == "fixed per call"}
    shared, alone = SharedMoments(**kw), SharedMoments(share=False, **kw)
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


def test_first_call_finds_the_sets_the_passes_keep_whole(tiny_flux, monkeypatch):
    """With more than one pass to plan, the sets are found on the model's first forward (no XᵀX formed) and each
    set's sum is counted once and recorded in one pass: fewer passes for the same budget, the same bits."""
    model, go = tiny_flux
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        # The tiny FLUX's sums, packed (a K <= 256 sum is one whole block): 5.59 MiB over 34 layers, less with the 4
        # sets' counted once; within 1.25 MiB that is 6 passes, or 5.
        budget = 1.25 / 1024
        alone = _calibrate(monkeypatch, False, model, run=go, search=False, hessian_budget_gib=budget)
        calls.clear()
        shared = _calibrate(monkeypatch, True, model, run=go, search=False, hessian_budget_gib=budget)
    finally:
        handle.remove()
    assert alone.info["hessian_passes"] > shared.info["hessian_passes"] > 1
    assert len(calls) == 1 + 2 * shared.info["hessian_passes"]  # one forward to find the sets, then 2 per pass
    _same_bits(shared, alone)
    assert _sets(shared) == sorted(FLUX_SETS, key=sorted)
    for names in FLUX_SETS:
        assert len({shared.hessian_files[n] for n in names}) == 1  # one pass, one shard
    # Each shard holds a shared sum once.
    for path in set(shared.hessian_files.values()):
        with safe_open(path, framework="pt") as f:
            held = {k.split(":", 1)[1] for k in f.keys()}
        assert not any(len(s & held) > 1 for s in FLUX_SETS)


def test_shared_sums_are_saved_once_and_load_back(tiny_flux, monkeypatch, tmp_path):
    model, go = tiny_flux
    for passes in (1, 2):
        stats = _calibrate(monkeypatch, True, model, run=go, search=False, hessian_passes=passes)
        path = tmp_path / f"s{passes}.safetensors"
        stats.save(path)
        with safe_open(path, framework="pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        assert meta["format_version"] == "4"
        held = {k.split(":", 1)[1] for k in keys if k.startswith("hessian:")}
        with safe_open(path, framework="pt") as f:  # each sum as its packed upper triangle: half the bytes
            for name in held:
                k = stats.act_absmax[name].numel()
                assert f.get_slice(f"hessian:{name}").get_shape() == [packed_size(k)], name
        assert len(held) == len(stats.hessian_names()) - sum(len(s) - 1 for s in FLUX_SETS)
        back = CalibrationStats.load(path)
        _same_bits(back, stats)
        assert _sets(back) == sorted(FLUX_SETS, key=sorted)
        back.save(tmp_path / "again.safetensors")  # from disk, aliases and all: still once
        with safe_open(tmp_path / "again.safetensors", framework="pt") as f:
            assert set(f.keys()) == keys
        _same_bits(CalibrationStats.load(tmp_path / "again.safetensors"), stats)


def test_statistics_files_are_version_2_without_xtx_4_with_it_and_version_3_still_loads(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 128))
    x = torch.randn(4, 64)
    plain = calibrate(model, run=lambda m: m(x), search=False, progress=False)
    plain.save(tmp_path / "p.safetensors")
    stats = calibrate(model, run=lambda m: m(x), search=False, progress=False, hessian=True)
    stats.save(tmp_path / "s.safetensors")
    for name, version in (("p", "2"), ("s", "4")):
        with safe_open(tmp_path / f"{name}.safetensors", framework="pt") as f:
            assert f.metadata()["format_version"] == version and "hessian_aliases" not in f.metadata()
    stats.hessian["2"] = stats.hessian["0"]  # one tensor for two layers: stored once
    stats.save(tmp_path / "t.safetensors")
    back = CalibrationStats.load(tmp_path / "t.safetensors")
    assert back.hessian_alias == {"2": "0"} and torch.equal(back.hessian_for("2"), stats.hessian["0"])
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, tmp_path / "bad.safetensors", meta | {"hessian_aliases": '{"2": "gone"}'})
    with pytest.raises(ValueError, match="hessian_aliases names XᵀX the file does not hold"):
        CalibrationStats.load(tmp_path / "bad.safetensors")
    # A version-3 file holds each XᵀX as the full [K, K]: it loads to the same sums, and saves again as version 4.
    full = {k: (unpack_moment(v) if k.startswith("hessian:") else v) for k, v in tensors.items()}
    save_file(full, tmp_path / "v3.safetensors", meta | {"format_version": "3"})
    old = CalibrationStats.load(tmp_path / "v3.safetensors")
    for name in ("0", "2"):
        assert torch.equal(old.hessian_for(name), stats.hessian["0"]), name
    old.save(tmp_path / "v4.safetensors")
    for name in ("0", "2"):
        assert torch.equal(CalibrationStats.load(tmp_path / "v4.safetensors").hessian_for(name), stats.hessian["0"])
    # A stored XᵀX of the wrong size is refused by name, from the header.
    for bad in (torch.zeros(7), torch.zeros(64, 32), torch.zeros(packed_size(32))):
        save_file(full | {"hessian:0": bad}, tmp_path / "shape.safetensors", meta)
        with pytest.raises(
            ValueError, match=r"shape.safetensors'.*hessian:0 is \[.*\], not the \[K, K\] XᵀX of a layer of width 64"
        ):
            CalibrationStats.load(tmp_path / "shape.safetensors")


PROMPTS = ["a red bicycle", "a cat on a mat", "snowy mountains at dawn"]


@pytest.mark.slow
def test_pipeline_items_share_with_the_bits_of_one_sum_each(tmp_path_factory, monkeypatch):
    """A tiny FluxPipeline over 3 prompts x 2 steps (the items' tree of sums), in 1 and 3 passes."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(build_pipeline(tmp_path_factory.mktemp("share-pipe")))
    kw = {"prompts": PROMPTS, "num_inference_steps": 2, "pipeline_kwargs": TINY_PIPELINE_KWARGS, "search": False}
    alone = _calibrate(monkeypatch, False, pipe, **kw)
    for passes in (1, 3):
        shared = _calibrate(monkeypatch, True, pipe, **kw, hessian_passes=passes)
        assert len(_sets(shared)) == 3  # the double block's two sets, the single block's
        _same_bits(shared, alone)


_TWO_PROCESSES = """
import os, sys
import torch
from torch import nn
from diffusers_svdquant import calibrate
from diffusers_svdquant.calibration import recorder
from diffusers_svdquant.calibration.processes import Processes

torch.manual_seed(0)
model = nn.ModuleDict({n: nn.Linear(64, 64) for n in "abcd"})
rank = int(os.environ["RANK"])

def go(m):
    for call in range(3):
        x = torch.randn(2, 150, 64, generator=torch.Generator().manual_seed(10 * rank + call))
        y = m["a"](x) + m["b"](x)
        # On rank 1, c leaves a and b on the second call; d never shares.
        y = y + m["c"](x if rank == 0 or call != 1 else x + 1)
        m["d"](y)

for name, share, passes in (("alone", False, 1), ("shared", True, 1), ("passes", True, 2)):
    recorder.SHARE_INPUTS = share
    stats = calibrate(model, run=go, search=False, progress=False, hessian=True, hessian_passes=passes)
    if rank == 0:
        stats.save(os.path.join(sys.argv[1], name + ".safetensors"))
Processes().close()  # every rank past its last collective before any leaves the group
"""


@pytest.mark.slow
def test_two_processes_sharing_differently_merge_to_the_bits_of_one_sum_each(tmp_path):
    """Two processes where c shares a's sum on one and not on the other: merged (in memory, and through the shards
    of 2 passes) to the bits of every layer's own sum. The pipeline's 1 vs 2 processes, with sharing, is
    test_calibration_commands.py::test_two_processes_give_the_statistics_of_one."""
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    alone, shared, passes = (
        CalibrationStats.load(tmp_path / f"{n}.safetensors") for n in ["alone", "shared", "passes"]
    )
    assert alone.info["num_processes"] == 2 and passes.info["hessian_passes"] == 2
    assert _sets(alone) == [] and _sets(shared) == _sets(passes) == [{"a", "b"}]
    _same_bits(shared, alone)
    _same_bits(passes, alone)
