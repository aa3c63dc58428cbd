"""``calibrate``: per-channel activation absmax of every nn.Linear input, via forward pre-hooks."""

from __future__ import annotations

import pytest
import torch
from models import TINY_PIPELINE_KWARGS, build_pipeline
from torch import nn

from diffusers_svdquant import CalibrationStats, calibrate
from diffusers_svdquant.calibration import load_calibration


class _Net(nn.Module):
    """Two top-level linears and a nested block with one more; ``skipped`` is never called."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 128)
        self.block = nn.Sequential(nn.GELU(), nn.Linear(128, 96))
        self.fc2 = nn.Linear(96, 32)
        self.skipped = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc2(self.block(self.fc1(x)))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    xs = [
        torch.randn(2, 5, 64, generator=g),
        torch.randn(3, 7, 64, generator=g),
        torch.randn(1, 1, 64, generator=g),
    ]
    xs[1][:, :, 10] *= 40  # an outlier channel in one call only
    return [x.to(dtype) for x in xs]


def _direct_absmax(net: _Net, xs):
    """Per-channel absmax over all tokens fed to each linear, from an explicit un-hooked forward."""
    seen = {"fc1": [], "block.1": [], "fc2": []}
    with torch.no_grad():
        for x in xs:
            h1 = x
            h2 = net.block[0](net.fc1(h1))
            h3 = net.block[1](h2)
            for name, h in (("fc1", h1), ("block.1", h2), ("fc2", h3)):
                seen[name].append(h.reshape(-1, h.shape[-1]))
    return {k: torch.cat(v).abs().amax(0).float() for k, v in seen.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_equal_direct_absmax(dtype):
    """act_absmax[name] equals the per-channel absmax over every token of every call (3-D inputs,
    several calls); num_tokens counts rows; a linear that never runs has no entry."""
    net = _Net().to(dtype)
    xs = _inputs(dtype)
    stats = calibrate(net, lambda m: [m(x) for x in xs])
    want = _direct_absmax(net, xs)
    assert set(stats.act_absmax) == set(want)
    for name, w in want.items():
        got = stats.act_absmax[name]
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert torch.equal(got, w), name
    assert stats.act_absmax["fc1"][10] > 30  # the outlier seen in the second call only
    assert stats.num_tokens == {"fc1": 10 + 21 + 1, "block.1": 32, "fc2": 32}


def test_stats_accumulate_over_calls_not_last():
    """The statistics are a running max: a later call with smaller inputs does not lower them."""
    net = _Net()
    big = torch.full((1, 2, 64), 5.0)
    small = torch.full((1, 2, 64), 0.5)
    stats = calibrate(net, lambda m: (m(big), m(small)))
    assert torch.equal(stats.act_absmax["fc1"], torch.full((64,), 5.0))
    assert stats.num_tokens["fc1"] == 4


def test_run_under_no_grad_and_model_unchanged():
    """run() executes under torch.no_grad and calibration leaves the weights untouched."""
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grad_enabled = []

    def run(m):
        grad_enabled.append(torch.is_grad_enabled())
        m(torch.randn(2, 64))

    calibrate(net, run)
    assert grad_enabled == [False]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_module_filter():
    """module_filter(name, linear) restricts the recorded layers and receives the nn.Linear."""
    net = _Net()
    seen = []

    def keep(name, module):
        seen.append((name, type(module)))
        return name.startswith("block")

    stats = calibrate(net, lambda m: m(torch.randn(3, 64)), module_filter=keep)
    assert set(stats.act_absmax) == {"block.1"}
    assert set(stats.num_tokens) == {"block.1"}
    assert sorted(seen) == sorted([(n, nn.Linear) for n in ("fc1", "block.1", "fc2", "skipped")])


def _hook_counts(net):
    return {n: len(m._forward_pre_hooks) for n, m in net.named_modules() if isinstance(m, nn.Linear)}


def test_hooks_removed():
    """After calibrate, no pre-hook remains: further forwards change nothing in the stats."""
    net = _Net()
    stats = calibrate(net, lambda m: m(torch.randn(2, 64)))
    assert all(c == 0 for c in _hook_counts(net).values())
    snapshot = {k: v.clone() for k, v in stats.act_absmax.items()}
    net(torch.full((2, 64), 1e3))
    for k, v in stats.act_absmax.items():
        assert torch.equal(v, snapshot[k])


def test_hooks_removed_when_run_raises():
    """If run() raises, the exception propagates and the hooks are still removed."""
    net = _Net()

    def run(m):
        m(torch.randn(2, 64))
        assert _hook_counts(m)["fc1"] == 1  # hooks were really installed during the run
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        calibrate(net, run)
    assert all(c == 0 for c in _hook_counts(net).values())


def test_existing_hooks_survive():
    """calibrate removes only its own hooks, not ones the user registered."""
    net = _Net()
    calls = []
    net.fc1.register_forward_pre_hook(lambda m, a: calls.append(1))
    calibrate(net, lambda m: m(torch.randn(1, 64)))
    assert len(net.fc1._forward_pre_hooks) == 1
    net(torch.randn(1, 64))
    assert len(calls) == 2


def test_empty_batch_is_ignored():
    """A call with zero tokens records nothing (no -inf / empty max)."""
    net = _Net()
    stats = calibrate(net, lambda m: (m(torch.randn(0, 64)), m(torch.randn(2, 3, 64))))
    assert stats.num_tokens["fc1"] == 6
    assert torch.isfinite(stats.act_absmax["fc1"]).all()


def test_save_load_round_trip(tmp_path):
    """save() then load() gives identical absmax, token counts, searched (α, β), search errors and info;
    samples only when asked for."""
    net = _Net()
    stats = calibrate(net, lambda m: [m(x) for x in _inputs()])
    assert set(stats.smoothing) == {"fc1", "block.1"}  # fc2 has K = 96, not a multiple of 64: not searched
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    back = CalibrationStats.load(path)
    assert set(back.act_absmax) == set(stats.act_absmax)
    for k, v in stats.act_absmax.items():
        assert back.act_absmax[k].dtype == torch.float32
        assert torch.equal(back.act_absmax[k], v), k
    assert back.num_tokens == stats.num_tokens
    assert back.smoothing == stats.smoothing
    assert all(torch.equal(back.search_errors[k], v) for k, v in stats.search_errors.items())
    assert back.info == stats.info and back.info["num_processes"] == 1
    assert back.samples == {}
    stats.save(path, include_samples=True)
    back = CalibrationStats.load(path)
    assert all(torch.equal(back.samples[k], v) for k, v in stats.samples.items())
    assert all(torch.equal(back.sample_keys[k], v) for k, v in stats.sample_keys.items())


def test_version_1_file_still_loads(tmp_path):
    """A file of bare ``name -> [K]`` tensors (format 1, no metadata) loads as absmax only."""
    from safetensors.torch import save_file

    save_file({"fc1": torch.arange(64.0)}, tmp_path / "v1.safetensors", metadata={"num_tokens": "{'fc1': 3}"})
    back = CalibrationStats.load(tmp_path / "v1.safetensors")
    assert torch.equal(back.act_absmax["fc1"], torch.arange(64.0)) and back.num_tokens == {"fc1": 3}
    assert back.smoothing == {}


def test_bad_files_are_named(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        CalibrationStats.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        CalibrationStats.load(tmp_path / "junk.safetensors")
    save_file({"act_absmax:x": torch.ones(64)}, tmp_path / "v9.safetensors",
              metadata={"format": "svdquant-calibration", "format_version": "9"})  # fmt: skip
    with pytest.raises(ValueError, match="format_version 9"):
        CalibrationStats.load(tmp_path / "v9.safetensors")
    with pytest.raises(TypeError, match="calibration must be"):
        load_calibration(42)


def test_files_that_are_not_calibration_files_are_refused(tmp_path):
    """A model's weights file (2-D, negative values) and another tool's safetensors file are refused by name."""
    from safetensors.torch import save_file

    weights = {"proj.weight": torch.randn(64, 64), "proj.bias": torch.randn(64)}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors' is not a calibration file: tensor 'proj\.\w+'"):
        CalibrationStats.load(tmp_path / "model.safetensors")
    save_file({"act_absmax:x": torch.ones(64)}, tmp_path / "other.safetensors",
              metadata={"format": "something-else", "format_version": "2"})  # fmt: skip
    with pytest.raises(ValueError, match=r"other.safetensors' is not a calibration file.*'something-else'"):
        CalibrationStats.load(tmp_path / "other.safetensors")


def test_statistics_record_what_they_were_made_from(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    stats = calibrate(model, run=lambda m: m(torch.randn(5, 64)), search=False, progress=False)
    stats.save(tmp_path / "s.safetensors")
    info = CalibrationStats.load(tmp_path / "s.safetensors").info
    assert info["model_class"] == "Sequential" and info["layers"] == {"0": [128, 64], "1": [64, 128]}


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """Saving writes a temporary file and renames it: an error mid-write leaves the old file intact."""
    net = _Net()
    stats = calibrate(net, lambda m: m(torch.randn(2, 64)), search=False)
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    before = path.read_bytes()
    from diffusers_svdquant.calibration import stats as stats_module

    def boom(path, *args, **kwargs):  # half a file written, then the disk fills up
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(stats_module, "write_tensors", boom)
    with pytest.raises(OSError, match="disk full"):
        stats.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors"]


def test_samples_are_rows_the_layer_saw():
    """Each layer keeps min(max_samples, tokens) of its real input rows, the same ones on a rerun."""
    net = _Net()
    xs = _inputs()
    stats = calibrate(net, lambda m: [m(x) for x in xs], max_samples=8, search=False)
    seen = torch.cat([x.reshape(-1, 64) for x in xs])
    rows = stats.samples["fc1"]
    assert rows.shape == (8, 64) and stats.sample_keys["fc1"].shape == (8,)
    assert all((seen == r).all(-1).any() for r in rows)
    assert len({tuple(r.tolist()) for r in rows}) == 8  # no row twice
    assert torch.all(stats.sample_keys["fc1"][1:] >= stats.sample_keys["fc1"][:-1])
    again = calibrate(net, lambda m: [m(x) for x in xs], max_samples=8, search=False)
    assert torch.equal(again.samples["fc1"], rows)
    few = calibrate(net, lambda m: m(torch.randn(3, 64)), max_samples=8, search=False)
    assert few.samples["fc1"].shape == (3, 64)
    none = calibrate(net, lambda m: m(torch.randn(3, 64)), max_samples=0)
    assert none.samples == {} and none.smoothing == {}


def test_merge_is_exact_and_order_free():
    """Merging parts gathered on disjoint inputs: max of absmax, sum of tokens, bottom-k of the union
    of samples; the order of the parts does not matter."""
    g = torch.Generator().manual_seed(0)

    def part(n):
        keys = torch.rand(n, generator=g, dtype=torch.float64).sort().values
        rows = torch.randn(n, 64, generator=g)
        return CalibrationStats(
            act_absmax={"a": rows.abs().amax(0)}, num_tokens={"a": n}, samples={"a": rows}, sample_keys={"a": keys}
        )

    parts = [part(5), part(7), part(3)]
    ab = CalibrationStats.merge(parts, max_samples=6)
    ba = CalibrationStats.merge(parts[::-1], max_samples=6)
    keys = torch.cat([p.sample_keys["a"] for p in parts])
    rows = torch.cat([p.samples["a"] for p in parts])
    order = torch.argsort(keys)[:6]
    for m in (ab, ba):
        assert torch.equal(m.sample_keys["a"], keys[order]) and torch.equal(m.samples["a"], rows[order])
        assert torch.equal(m.act_absmax["a"], rows.abs().amax(0))
        assert m.num_tokens == {"a": 15}


def test_search_requires_samples():
    with pytest.raises(ValueError, match="max_samples"):
        calibrate(_Net(), lambda m: m(torch.randn(2, 64)), max_samples=0, search=True)


def test_bad_targets():
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        calibrate(_Net())
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        calibrate("not a model", run=lambda m: None)


def test_searched_smoothing_is_used_unless_alpha_is_given():
    """smoothing_for: the searched (α, β) by default, an explicit α for every layer, (0.5, 0.5) when no
    search ran, and no absmax (λ = 1) for a layer without statistics."""
    stats = CalibrationStats(act_absmax={"a": torch.ones(64), "b": torch.ones(64)}, smoothing={"a": (0.8, 0.1)})
    assert stats.smoothing_for("a", None)[1:] == (0.8, 0.1)
    assert stats.smoothing_for("b", None)[1:] == (0.5, 0.5)
    assert stats.smoothing_for("a", 0.3)[1:] == (0.3, 0.7)
    assert stats.smoothing_for("c", None)[0] is None


def test_keyword_input_is_recorded():
    """A linear called with its input as a keyword argument is recorded like a positional call."""
    lin = nn.Linear(64, 8)
    x = torch.randn(2, 64)
    stats = calibrate(lin, lambda m: m(input=x))
    assert torch.equal(stats.act_absmax[""], x.abs().amax(0))


# ------------------------------------------------------------------------------- whole pipelines


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(build_pipeline(tmp_path_factory.mktemp("calib-pipe")))


PROMPTS = ["a red bicycle", "a cat on a mat", "snowy mountains at dawn"]


def test_pipeline_statistics_equal_a_direct_recording(tiny_pipe):
    """calibrate(pipe, prompts) hooks exactly the denoiser layers the default config quantizes, and each
    layer's absmax / token count equal what a plain forward pre-hook sees over the same generations."""
    from diffusers_svdquant import SVDQuantConfig
    from diffusers_svdquant.config import quantizable_linears

    stats = calibrate(tiny_pipe, prompts=PROMPTS, num_inference_steps=2, pipeline_kwargs=TINY_PIPELINE_KWARGS,
                      search=False)  # fmt: skip
    assert set(stats.act_absmax) == set(quantizable_linears(tiny_pipe.transformer, SVDQuantConfig()))
    assert stats.info["prompts"] == 3 and stats.info["component"] == "transformer"

    seen: dict[str, list[torch.Tensor]] = {}
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2"]
    handles = [
        tiny_pipe.transformer.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).clone())
        )
        for n in names
    ]
    try:
        for i, p in enumerate(PROMPTS):
            tiny_pipe(prompt=p, num_inference_steps=2, generator=torch.Generator().manual_seed(i), output_type="latent",
                      **TINY_PIPELINE_KWARGS)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    for n in names:
        rows = torch.cat(seen[n])
        assert torch.equal(stats.act_absmax[n], rows.abs().amax(0).float()), n
        assert stats.num_tokens[n] == rows.shape[0], n
        assert all((rows == r).all(-1).any() for r in stats.samples[n]), n


def test_pipeline_calibration_searches_and_quantizes(tiny_pipe, tmp_path):
    """The searched statistics file feeds from_pretrained: layers get their own (α, β), and the model
    quantized with them is at least as close to 16-bit as with α = 0.5 for all."""
    from diffusers import FluxTransformer2DModel

    from diffusers_svdquant import SVDQuantConfig

    stats = calibrate(tiny_pipe, prompts=PROMPTS, num_inference_steps=2, pipeline_kwargs=TINY_PIPELINE_KWARGS,
                      config=SVDQuantConfig(rank=16))  # fmt: skip
    # Every W4A4 layer searched; the weight-only ones (the AdaLN linears) have statistics but take α = 0.5.
    weight_only = {n for n in stats.act_absmax if SVDQuantConfig().is_weight_only(n)}
    assert weight_only and set(stats.smoothing) == set(stats.act_absmax) - weight_only
    for name, errs in stats.search_errors.items():
        assert errs[0] <= errs[1], name  # the searched pair never scores worse than no smoothing
    assert stats.info["search_rank"] == 16
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    tiny_pipe.transformer.save_pretrained(tmp_path / "t")
    inputs = _flux_inputs_for(tiny_pipe)
    ref = tiny_pipe.transformer(**inputs, return_dict=False)[0]

    def error(**cfg):
        m = FluxTransformer2DModel.from_pretrained(tmp_path / "t", quantization_config=SVDQuantConfig(rank=16, **cfg))
        with torch.no_grad():
            return ((m(**inputs, return_dict=False)[0] - ref).norm() / ref.norm()).item()

    searched, fixed, none = error(calibration=str(path)), error(calibration=str(path), smoothing_alpha=0.5), error()
    assert searched <= fixed * 1.05 and searched <= none * 1.05, (searched, fixed, none)


def _flux_inputs_for(pipe):
    g = torch.Generator().manual_seed(5)
    t = pipe.transformer.config
    return {
        "hidden_states": torch.randn(1, 64, t.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 16, t.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, t.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(64, 3),
        "txt_ids": torch.zeros(16, 3),
    }


@pytest.mark.parametrize("hessian_sum", ["tree", "fixed"])
def test_hessian_prompts_gathers_xtx_over_an_even_spread_of_the_prompts(tiny_pipe, hessian_sum):
    """hessian_prompts=2 of 4: XᵀX over prompts 0 and 2 (their own seeds) alone, in every pass plan; the statistics
    still over all 4; the pass after the first runs those 2 prompts only."""
    from diffusers_svdquant.calibration.passes import spread_items

    assert spread_items(4, 2) == {0: 0, 2: 1} and spread_items(7, 3) == {0: 0, 2: 1, 4: 2}
    assert spread_items(3, 5) == {0: 0, 1: 1, 2: 2} and spread_items(5, None) == {i: i for i in range(5)}
    prompts = [*PROMPTS, "a lighthouse in fog"]
    name = "transformer_blocks.0.attn.to_q"
    rows: list[torch.Tensor] = []
    handle = tiny_pipe.transformer.get_submodule(name).register_forward_pre_hook(
        lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).double().clone())
    )
    kw = {"prompts": prompts, "num_inference_steps": 2, "pipeline_kwargs": TINY_PIPELINE_KWARGS, "search": False,
          "progress": False, "hessian": True, "hessian_sum": hessian_sum, "hessian_prompts": 2}  # fmt: skip
    try:
        one = calibrate(tiny_pipe, **kw)
        calls = len(rows)
        rows.clear()
        two = calibrate(tiny_pipe, **kw, hessian_passes=2)
    finally:
        handle.remove()
    assert one.info["hessian_prompts"] == 2 and one.num_tokens[name] == 4 * 2 * rows[-1].shape[0]
    # The first forward (the probe; the shared sets of a plan of 2 passes), 4 prompts x 2 steps, then pass 2 reruns
    # prompts 0 and 2 alone: 4 calls.
    assert calls == 8 + (hessian_sum == "fixed") and len(rows) == 1 + 8 + 4 and two.info["hessian_passes"] == 2
    per_call = torch.stack([r.t() @ r for r in rows[1:9]])
    want = per_call[[0, 1, 4, 5]].sum(0).float()  # prompts 0 and 2
    for stats in (one, two):
        torch.testing.assert_close(stats.hessian_for(name), want, rtol=1e-5, atol=1e-5 * float(want.diagonal().max()))
        assert torch.equal(stats.hessian_for(name), one.hessian_for(name))
    with pytest.raises(ValueError, match="hessian_prompts must be an integer >= 1, got 0"):
        calibrate(tiny_pipe, **(kw | {"hessian_prompts": 0}))
    with pytest.raises(ValueError, match="need hessian=True"):
        calibrate(tiny_pipe, prompts=PROMPTS, hessian_prompts=2)
    with pytest.raises(ValueError, match="hessian_prompts is for a pipeline's prompts"):
        calibrate(tiny_pipe.transformer, run=lambda m: None, hessian=True, hessian_prompts=2)


def test_spread_items_are_neighbours_in_the_summation_tree():
    """XᵀX over items 0, 4, 8, 12 of 16: filed as places 0-3, so the tree pairs them into one block (by their indices
    no two would be siblings, and a process would hold one partial sum per item)."""
    from torch import nn

    from diffusers_svdquant.calibration.packed import unpack_moment
    from diffusers_svdquant.calibration.passes import spread_items
    from diffusers_svdquant.calibration.recorder import Recorder, forward_pre_hooks

    lin = nn.Linear(8, 8)
    recorder = Recorder(0, 0, ["l"], record_stats=False, places=spread_items(16, 4))
    xs = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    with forward_pre_hooks([(lin, recorder.hook("l"))]):
        for i, x in enumerate(xs):
            recorder.start_item(i)
            lin(x)
    recorder.finish_item()
    tree = recorder.take_moments()["l"]
    assert [(first, n) for first, n, _ in tree.blocks] == [(0, 4)]
    want = sum(xs[i].double().t() @ xs[i].double() for i in (0, 4, 8, 12))
    torch.testing.assert_close(unpack_moment(tree.total()).double(), want, rtol=1e-5, atol=1e-5)


def test_pipeline_bad_arguments(tiny_pipe):
    with pytest.raises(ValueError, match="prompts for a pipeline"):
        calibrate(tiny_pipe, run=lambda m: None)
    with pytest.raises(ValueError, match="no module component 'vae2'"):
        calibrate(tiny_pipe, prompts=PROMPTS, component="vae2")
    with pytest.raises(ValueError, match="non-empty list"):
        calibrate(tiny_pipe, prompts=[])
    with pytest.raises(ValueError, match="num_inference_steps"):
        calibrate(tiny_pipe, prompts=PROMPTS, num_inference_steps=0)
