"""``calibrate``: per-channel activation absmax of every nn.Linear input, via forward pre-hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_svdquant import CalibrationStats, calibrate


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
    """save() then load() gives identical act_absmax tensors and num_tokens."""
    net = _Net()
    stats = calibrate(net, lambda m: [m(x) for x in _inputs()])
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    back = CalibrationStats.load(path)
    assert set(back.act_absmax) == set(stats.act_absmax)
    for k, v in stats.act_absmax.items():
        assert back.act_absmax[k].dtype == torch.float32
        assert torch.equal(back.act_absmax[k], v), k
    assert back.num_tokens == stats.num_tokens
    # and the file is a plain safetensors file of [K] tensors under the module names
    from safetensors.torch import load_file

    raw = load_file(path)
    assert {k: tuple(v.shape) for k, v in raw.items()} == {"fc1": (64,), "block.1": (128,), "fc2": (96,)}


def test_keyword_input_is_recorded():
    """A linear called with its input as a keyword argument is recorded like a positional call."""
    lin = nn.Linear(64, 8)
    x = torch.randn(2, 64)
    stats = calibrate(lin, lambda m: m(input=x))
    assert torch.equal(stats.act_absmax[""], x.abs().amax(0))
