"""ops/fixed_point.py: the fixed-point XᵀX add on its CPU kernel (cpp/cpu/fixedpoint.cpp) and CUDA kernel
(cpp/cuda/fixedpoint.cu) against ``reference.fixed_point_add``: the same integers bit for bit and the same answer
to "did every unit and diagonal stay below 2^62", on packed widths across the 256-row blocks (K = 0, 1, 255, 256,
257, 600, 1000), offsets of both kinds of units, 1–3 threads, ties, the limits exactly, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_svdquant import ops, reference
from diffusers_svdquant.calibration.fixedpoint import FixedPointSum, channel_exponents
from diffusers_svdquant.calibration.packed import pack_blocks, pack_moment, packed_size
from diffusers_svdquant.ops import native

needs_native = pytest.mark.skipif(not ops.native_available(), reason="_C not built")
HAS_GPU = torch.cuda.is_available() and ops.cuda_kernels_available()
LIMIT = reference.FIXED_POINT_LIMIT


def case(k: int, seed: int, jitter: tuple[int, int] = (0, 2), spread: float = 6.0):
    """A packed float32 item (XᵀX of rows whose channels lie 2·spread decades apart), int64 sums far from 0, and
    exponents: each channel's ⌈log2 √(Σx²)⌉ (units in which the item fits at offsets down to −61, as calibration
    sizes them) plus a random jitter in ``[lo, hi]``: below 0 some items overflow, far above 0 units round to 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(1, 3 * k), k, generator=g) * torch.logspace(-spread, spread, k)
    full = x.t() @ x
    item = pack_moment(full) if k else torch.zeros(0)
    ints = torch.randint(-(2**40), 2**40, (packed_size(k),), generator=g)
    base = channel_exponents(full.diagonal().double().sqrt())
    return ints, item, base + torch.randint(jitter[0], jitter[1] + 1, (k,), generator=g)


def both(ints, item, exponents, offset, threads=None):
    """(reference result, reference ints, op result, op ints) on copies of ``ints``."""
    want, got = ints.clone(), ints.clone()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ok = ops.fixed_point_add(got, item, exponents, offset)
    finally:
        torch.set_num_threads(before)
    return reference.fixed_point_add(want, item, exponents, offset), want, ok, got


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("offset", [-27, -45, -61])
@pytest.mark.parametrize("k", [0, 1, 5, 255, 256, 257, 600, 1000])
def test_cpu_kernel_matches_reference(k, offset, threads):
    ints, item, exponents = case(k, seed=k - offset)
    want_ok, want, ok, got = both(ints, item, exponents, offset, threads)
    assert want_ok and ok
    assert torch.equal(got, want)
    assert not torch.equal(got, ints) or k == 0


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(0, 700),
    seed=st.integers(0, 2**16),
    offset=st.integers(-61, -20),
    lo=st.integers(-4, 0),
    hi=st.integers(0, 140),
)
def test_cpu_kernel_matches_reference_hypothesis(k, seed, offset, lo, hi):
    # Units from calibration's down to 2^-140 of them, some 2^4 too small (those items may overflow): the
    # answers agree, and the bits wherever the item fits.
    ints, item, exponents = case(k, seed, jitter=(lo, hi))
    want_ok, want, ok, got = both(ints, item, exponents, offset)
    assert ok == want_ok
    if want_ok:
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_ties_round_to_even(device):
    if device == "cuda" and not HAS_GPU:
        pytest.skip("needs an NVIDIA GPU and the CUDA kernels")
    k = 3  # one row block: the packed item is the whole 3 x 3, row-major
    item = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5, 5.5], device=device)
    ints = torch.zeros(packed_size(k), dtype=torch.int64, device=device)
    assert ops.fixed_point_add(ints, item, torch.zeros(k, dtype=torch.int64, device=device), 0)
    assert ints.tolist() == [0, 2, 2, 0, -2, -2, 4, 4, 6]
    # Halves reached through the shifts −(s_j + s_l), s = (0, 0, 1): 2.5 = 5·2⁻¹, 0.5, 1.5 and 1.25 = 5·2⁻².
    ints.zero_()
    assert ops.fixed_point_add(ints, torch.tensor([1.0, 3.0, 5.0] * 3, device=device),
                               torch.tensor([0, 0, 1], device=device), 0)  # fmt: skip
    assert ints.tolist() == [1, 3, 2, 1, 3, 2, 0, 2, 1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_limits_exactly(device):
    if device == "cuda" and not HAS_GPU:
        pytest.skip("needs an NVIDIA GPU and the CUDA kernels")
    zeros = torch.zeros(2, dtype=torch.int64, device=device)  # K = 2: entries (0,0), (0,1), (1,0), (1,1)

    def add(start, values):
        ints = torch.tensor(start, dtype=torch.int64, device=device)
        item = torch.tensor(values, dtype=torch.float32, device=device)
        ok = ops.fixed_point_add(ints, item, zeros, 0)
        assert ok == reference.fixed_point_add(torch.tensor(start), item.cpu(), zeros.cpu(), 0)
        return ok, ints.tolist()

    # A diagonal may reach 2^62 − 1 and not 2^62 (compared as integers, not through float32).
    assert add([LIMIT - 3, 0, 0, 0], [2.0, 0.0, 0.0, 0.0]) == (True, [LIMIT - 1, 0, 0, 0])
    assert not add([LIMIT - 3, 0, 0, 0], [3.0, 0.0, 0.0, 0.0])[0]
    assert not add([0, 0, 0, LIMIT - 1], [0.0, 0.0, 0.0, 1.0])[0]  # the last diagonal
    # Off the diagonal a partial sum may pass 2^62 (Cauchy-Schwarz bounds the total); one item's unit may not.
    assert add([0, LIMIT - 1, 0, 0], [0.0, 1.0, 0.0, 0.0]) == (True, [0, LIMIT, 0, 0])
    assert add([0, 0, 0, 0], [0.0, 0.0, -(2.0**62) + 2**38, 0.0])[0]  # the largest float32 below 2^62 fits
    assert not add([0, 0, 0, 0], [0.0, 0.0, -(2.0**62), 0.0])[0]


@needs_native
def test_bad_arguments_are_named():
    ints, item, exponents = case(300, seed=1)
    with pytest.raises(ValueError, match=r"item must be float32 \[\d+\] \(K = 300"):
        ops.fixed_point_add(ints, item[:-1], exponents, 0)
    with pytest.raises(ValueError, match="ints must be contiguous int64"):
        ops.fixed_point_add(ints.int(), item, exponents, 0)
    with pytest.raises(ValueError, match="item must be float32"):
        ops.fixed_point_add(ints, item.double(), exponents, 0)
    with pytest.raises(ValueError, match="exponents must be int64"):
        ops.fixed_point_add(ints, item, exponents.int(), 0)
    with pytest.raises(ValueError, match="offset must be within"):
        ops.fixed_point_add(ints, item, exponents, 600)
    with pytest.raises(ValueError, match="share a device"):
        ops.fixed_point_add(ints, item.to("meta"), exponents, 0)
    with pytest.raises(ValueError, match="K must be at most"):  # the binding's own check, before any memory
        native._C.fixed_point_add(ints.data_ptr(), item.data_ptr(), exponents.data_ptr(), 2**25, 0, 1)


def test_sum_refuses_exponents_the_kernels_cannot_scale_by():
    with pytest.raises(ValueError, match=r"'layer'.*beyond ±512"):
        FixedPointSum(torch.tensor([0, 600]), -27, bounded=False, name="layer")


def test_without_native_the_reference_runs(monkeypatch):
    ints, item, exponents = case(257, seed=3)
    want = ints.clone()
    assert reference.fixed_point_add(want, item, exponents, -27)
    monkeypatch.setattr(native, "_C", None)
    with pytest.warns(RuntimeWarning, match="fixed_point_add.*reference"):
        assert ops.fixed_point_add(ints, item, exponents, -27)
    assert torch.equal(ints, want)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and the CUDA kernels")
@pytest.mark.parametrize("offset", [-27, -61])
@pytest.mark.parametrize("k", [1, 255, 257, 1000, 3072])
def test_cuda_kernel_matches_reference(k, offset):
    ints, item, exponents = case(k, seed=k)
    want = ints.clone()
    assert reference.fixed_point_add(want, item, exponents, offset)
    got = ints.cuda()
    assert ops.fixed_point_add(got, item.cuda(), exponents.cuda(), offset)
    assert torch.equal(got.cpu(), want)
    for jitter in ((-3, 3), (0, 140)):  # some items overflowing; most units rounding to 0
        ints, item, exponents = case(k, seed=k + jitter[1], jitter=jitter)
        want, got = ints.clone(), ints.cuda()
        want_ok = reference.fixed_point_add(want, item, exponents, offset)
        assert ops.fixed_point_add(got, item.cuda(), exponents.cuda(), offset) == want_ok
        if want_ok:
            assert torch.equal(got.cpu(), want)
    # The last row block far beyond the units: both say so.
    loud = item.clone()
    pack_blocks(loud, k)[-1][2].fill_(2.0**100)
    assert not ops.fixed_point_add(ints.cuda(), loud.cuda(), exponents.cuda(), offset)
    assert not reference.fixed_point_add(ints.clone(), loud, exponents, offset)
