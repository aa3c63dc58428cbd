"""calibration/fixedpoint.py: the int64 fixed-point sum of per-item XᵀX (exact in any order; in units from the
statistics it cannot overflow, in units from a probe its overflow is seen alike on every split)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from diffusers_svdquant.calibration.fixedpoint import FixedPointSum, channel_exponents
from diffusers_svdquant.calibration.hessian import input_moment
from diffusers_svdquant.calibration.packed import pack_blocks, packed_size, unpack_moment


def _pack(full: torch.Tensor) -> torch.Tensor:
    """A [K, K] matrix in the packed layout of the sums (its upper row blocks, flat)."""
    k = full.shape[0]
    return torch.cat([full[r0:r1, r0:].reshape(-1) for r0, r1, _ in pack_blocks(torch.empty(packed_size(k)), k)])


def _items(n: int, k: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """n items' packed float32 XᵀX of rows with channels 12 orders of magnitude apart, and their absmax / rows."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-6, 6, k, dtype=torch.float64)
    xs = [torch.randn(int(torch.randint(1, 40, (1,), generator=g)), k, generator=g, dtype=torch.float64) * scale
          for _ in range(n)]  # fmt: skip
    xs[0][:, 3] = 0.0  # a channel that is zero in every row of one item
    rows = sum(x.shape[0] for x in xs)
    absmax = torch.stack([x.abs().amax(0) for x in xs]).amax(0).float()
    return [input_moment(x.float()) for x in xs], absmax, rows


def test_channel_exponents_are_the_ceiling_of_log2():
    a = torch.tensor([1.0, 2.0, 3.0, 0.75, 0.5, 1e-30, 0.0, 2.0**-149])
    expected = [0, 1, 2, 0, -1, -99, 0, -149]
    assert channel_exponents(a).tolist() == expected
    assert ((2.0 ** channel_exponents(a[:6]).double()) >= a[:6].double()).all()


def _split_sums(new, items: list[torch.Tensor], rng: random.Random) -> FixedPointSum:
    """The items added in a random order into a random number of parts (made by ``new()``), merged in random order."""
    n = len(items)
    order = list(range(n))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(0, 3)))) if n > 1 else []
    parts = []
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        part = new()
        for i in order[lo:hi]:
            part.add(i, items[i])
        parts.append(part)
    rng.shuffle(parts)
    return FixedPointSum.merge(parts)


@pytest.mark.parametrize("units", ["statistics", "probe"])
@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_any_split_and_order_gives_the_same_bits(n, units):
    items, absmax, rows = _items(n, 24, n)
    if units == "statistics":
        new = lambda: FixedPointSum.from_statistics(absmax, rows, "layer")  # noqa: E731
    else:  # the first item's own energy, as calibrate's probe is the first forward
        energy = unpack_moment(items[0]).diagonal().double()
        new = lambda: FixedPointSum.from_probe(energy, "layer")  # noqa: E731
    one = new()
    for i, t in enumerate(items):
        one.add(i, t)
    assert not one.overflowed
    want = one.total()
    rng = random.Random(n)
    for _ in range(8):
        assert torch.equal(_split_sums(new, items, rng).total(), want)
    exact = torch.stack([t.double() for t in items]).sum(0)
    torch.testing.assert_close(want.double(), exact, rtol=2e-6, atol=1e-7 * float(exact.abs().max()))


@pytest.mark.parametrize("n", [1, 5, 32])
def test_the_sum_is_float32_close_to_the_exact_one(n):
    """Within one float32 rounding of the exact sum of the items, plus ~2^-59 of rows·absmax_j·absmax_l per item."""
    items, absmax, rows = _items(n, 16, 100 + n)
    acc = FixedPointSum.from_statistics(absmax, rows)
    for i, t in enumerate(items):
        acc.add(i, t)
    exact = torch.stack([t.double() for t in items]).sum(0)
    bound = _pack(rows * absmax.double()[:, None] * absmax.double()[None, :])
    err = (acc.total().double() - exact).abs()
    assert (err <= exact.abs() * 2.0**-24 + n * bound * 2.0**-57).all()
    # Channel 3 is zero in item 0's rows: its entries are zero exactly when every item's are.
    assert bool((unpack_moment(acc.total())[3] == 0).all()) == bool((unpack_moment(exact)[3] == 0).all())


def test_the_integers_stay_below_two_to_the_62():
    """The worst case the statistics allow: every row at absmax in every channel."""
    k, rows = 8, 1000
    absmax = torch.full((k,), 3.0)
    acc = FixedPointSum.from_statistics(absmax, rows)
    x = torch.full((rows, k), 3.0)
    for i in range(0, rows, 100):
        acc.add(i, input_moment(x[i : i + 100]))
    assert acc.sum.abs().max() < 2**62
    torch.testing.assert_close(unpack_moment(acc.total()), x.t() @ x)


def test_errors_name_the_layer():
    absmax = torch.ones(4)
    acc = FixedPointSum.from_statistics(absmax, 10, "blocks.0.ff")
    with pytest.raises(ValueError, match=r"'blocks.0.ff'.*item 3's XᵀX exceeds rows · absmax²"):
        acc.add(3, torch.full((16,), 1e6))  # far more than 10 rows of |x| <= 1 can give
    with pytest.raises(ValueError, match=r"'blocks.0.ff'.*item 4's XᵀX is not finite"):
        acc.add(4, torch.full((16,), float("nan")))
    with pytest.raises(ValueError, match=r"item 5 is \[3, 3\], expected \[16\] \(K = 4, packed\)"):
        acc.add(5, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="rows must be >= 1"):
        FixedPointSum.from_statistics(absmax, 0, "x")
    with pytest.raises(ValueError, match="finite"):
        FixedPointSum.from_statistics(torch.tensor([1.0, float("inf")]), 3, "x")
    with pytest.raises(ValueError, match="different statistics"):
        FixedPointSum.merge([FixedPointSum.from_statistics(absmax, 10), FixedPointSum.from_statistics(absmax * 4, 10)])


def test_copy_host_and_an_empty_sum():
    items, absmax, rows = _items(3, 8, 7)
    acc = FixedPointSum.from_statistics(absmax, rows, "l")
    assert torch.equal(acc.total(), torch.zeros(packed_size(8))) and acc.copy().total().abs().sum() == 0
    acc.add(0, items[0])
    fork = acc.copy()
    fork.add(1, items[1])
    acc.add(2, items[2])
    assert acc.host() is acc and acc.sum.device.type == "cpu"
    alone = FixedPointSum.from_statistics(absmax, rows, "l")
    for i in (0, 2):
        alone.add(i, items[i])
    assert torch.equal(acc.total(), alone.total())  # the fork's item 1 did not reach it
    assert not torch.equal(fork.total(), acc.total())
    assert torch.equal(FixedPointSum.merge([FixedPointSum.from_statistics(absmax, rows), acc]).total(), acc.total())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_items_on_a_gpu_are_summed_there_to_the_cpu_bits():
    items, absmax, rows = _items(5, 32, 3)
    cpu, gpu = FixedPointSum.from_statistics(absmax, rows), FixedPointSum.from_statistics(absmax, rows)
    for i, t in enumerate(items):
        cpu.add(i, t)
        gpu.add(i, t.cuda())
    assert gpu.sum.is_cuda
    assert torch.equal(gpu.total(), cpu.total()) and not gpu.sum.is_cuda


def test_probe_units_are_the_channels_norms_floored_eight_below_the_largest():
    energy = torch.tensor([4.0, 1.0, 0.0, 2.0**-30, 3.0, 2.0**40, 2.0**30])
    acc = FixedPointSum.from_probe(energy, "l")
    # ⌈log2 √e⌉: 1, 0, (silent), −15, 1, 20, 15; floored at 20 − 8 = 12
    assert acc.exponents.tolist() == [12, 12, 12, 12, 12, 20, 15] and acc.offset == -27 and not acc.bounded
    assert FixedPointSum.from_probe(torch.tensor([4.0, 1.0, 0.0]), "l").exponents.tolist() == [1, 0, -7]
    assert FixedPointSum.from_probe(torch.zeros(3), "l").exponents.tolist() == [0, 0, 0]
    for bad in (torch.tensor([1.0, -1.0]), torch.tensor([float("nan")]), torch.ones(2, 2)):
        with pytest.raises(ValueError, match=r"FixedPointSum\('l'\): the probe's energy must be"):
            FixedPointSum.from_probe(bad, "l")
    assert not acc.same_units(FixedPointSum.from_probe(energy * 4, "l"))
    assert acc.same_units(FixedPointSum.from_probe(energy * 0.99, "m"))  # the same exponents: the same integers


@pytest.mark.parametrize("n", [3, 4])
def test_overflow_beyond_the_probe_is_seen_on_every_split_alike(n):
    """Probe energy 1 per channel: units 2^-27 on the diagonal, whose sums must stay below 2^62 units (2^35). Items of
    two rows at ±2^16 give 2^33 each: three fit, the fourth reaches the limit, and every split and order sees it."""
    k = 4
    signs = torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    xs = [torch.stack([signs[i], signs[(i + 1) % 4]]) * 2.0**16 for i in range(n)]
    items = [input_moment(x) for x in xs]
    new = lambda: FixedPointSum.from_probe(torch.ones(k), "blocks.3.ff")  # noqa: E731
    rng = random.Random(n)
    for _ in range(12):
        merged = _split_sums(new, items, rng)
        assert merged.overflowed == (n == 4)
        if n == 3:
            torch.testing.assert_close(unpack_moment(merged.total()), sum(x.t() @ x for x in xs))
    if n == 3:  # 3·2^33 real = 3·2^60 units on the diagonal: log2(3) bits short of 2^62
        assert merged.headroom_bits() == pytest.approx(2 - math.log2(3))
    else:
        assert merged.headroom_bits() == 0.0
    assert new().headroom_bits() == 62.0
    if n == 4:
        with pytest.raises(ValueError, match=r"'blocks.3.ff'\) overflowed its probe's units"):
            merged.total()
        # Overflowed, the integers are let go of and later items are ignored; the NaN check still holds.
        assert merged.sum is None and merged.copy().overflowed
        merged.add(9, items[0])
        assert merged.sum is None
        with pytest.raises(ValueError, match="item 10's XᵀX is not finite"):
            merged.add(10, torch.full_like(items[0], float("nan")))
    # One item alone over the limit: an off-diagonal entry (which the diagonal would have bounded) or the diagonal.
    big = new()
    big.add(0, input_moment(torch.full((1, k), 2.0**18)))
    assert big.overflowed


def test_units_from_the_statistics_never_overflow_and_say_so_when_inputs_grew():
    """The same items in units from their own statistics fit whatever their size; beyond them is an error."""
    x = torch.full((4, 4), 2.0**40)
    acc = FixedPointSum.from_statistics(x.abs().amax(0), 4, "l")
    acc.add(0, input_moment(x))
    assert not acc.overflowed
    torch.testing.assert_close(unpack_moment(acc.total()), x.t() @ x)
    with pytest.raises(ValueError, match="exceeds rows · absmax²"):
        acc.add(1, input_moment(2 * x))
