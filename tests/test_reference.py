"""The spec kernels in ``reference.py`` against independent float computations of docs/design.md §1.

Tolerances (for :func:`reference.gemm_w4a4` against a float64 evaluation of the same formula):
every element may differ by ``1e-5 * mag + u * |y|``, where ``mag = |X̃| @ |W̃|.T + |lora_act| @
|lora_up|.T + |bias|`` is the sum of the absolute values of all terms (float32 accumulation over at
most a few hundred terms stays well inside ``1e-5`` relative to it) and ``u`` is the unit roundoff
of the output dtype (0 for float32, ``2**-8`` for bfloat16, ``2**-11`` for float16, plus ``2**-25``
absolute for float16 subnormals).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from diffusers_svdquant import algorithm, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (relative, absolute) rounding of the result to the output dtype; the absolute part covers float16
# subnormals (spacing 2**-24 below 2**-14).
OUT_ROUNDOFF = {
    torch.float32: (0.0, 0.0),
    torch.bfloat16: (2.0**-8, 0.0),
    torch.float16: (2.0**-11, 2.0**-25),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- packing


def test_pack_nibble_order_known_bytes():
    """Element 2j goes in the low nibble, 2j+1 in the high nibble, two's complement."""
    codes = torch.tensor([[1, 2, -1, 0, 0, -8, -8, 7, 7, -1, -3, 5]], dtype=torch.int8)
    packed = reference.pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (1, 6)
    assert packed.tolist() == [[0x21, 0x0F, 0x80, 0x78, 0xF7, 0x5D]]


def test_unpack_known_bytes():
    """Bytes decode to (low nibble, high nibble) as signed 4-bit values."""
    packed = torch.tensor([0x21, 0x0F, 0x80, 0x78, 0xF7, 0x5D, 0x00, 0xFF], dtype=torch.uint8)
    codes = reference.unpack_int4(packed)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [1, 2, -1, 0, 0, -8, -8, 7, 7, -1, -3, 5, 0, 0, -1, -1]


def test_pack_unpack_round_trip_all_pairs():
    """Every pair of codes in [-8, 7] survives pack → unpack, and every byte survives unpack → pack."""
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8)  # [256, 2]
    assert torch.equal(reference.unpack_int4(reference.pack_int4(pairs)), pairs)
    # the packing is a bijection between code pairs and bytes
    assert sorted(reference.pack_int4(pairs).flatten().tolist()) == list(range(256))
    allbytes = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(reference.pack_int4(reference.unpack_int4(allbytes)), allbytes)


@pytest.mark.parametrize("shape", [(0, 64), (3, 128), (2, 5, 64), (1, 2)])
def test_pack_unpack_round_trip_random(shape):
    """Round trip on random codes with leading dimensions; the packed last dim is halved."""
    codes = torch.randint(-8, 8, shape, generator=_gen(0), dtype=torch.int8)
    packed = reference.pack_int4(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(reference.unpack_int4(packed), codes)


def test_pack_odd_k_raises():
    """An odd last dimension cannot be packed two per byte."""
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        reference.pack_int4(torch.zeros(2, 5, dtype=torch.int8))


# ------------------------------------------------------------------------------------ quantize_groups


@pytest.mark.parametrize("scale_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 192), (2, 3, 128)])
def test_quantize_groups_scales_codes_error(shape, scale_dtype):
    """Codes in [-8, 7]; scale = absmax/7 rounded to scale_dtype; codes are round(x/s) with the
    rounded scale; per-element error <= s/2 wherever the code was not clamped."""
    x = torch.randn(shape, generator=_gen(1)) * 3
    x[..., 5] = 40.0  # a large value in the first group of every row
    codes, scales = reference.quantize_groups(x, 64, scale_dtype)
    k = shape[-1]
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == scale_dtype and scales.shape == (*shape[:-1], k // 64)
    assert codes.min() >= -8 and codes.max() <= 7

    g = x.reshape(*shape[:-1], k // 64, 64)
    expected_scales = (g.abs().amax(-1) / 7).to(scale_dtype)
    assert torch.equal(scales, expected_scales)

    s = scales.float().unsqueeze(-1)
    expected_codes = torch.round(g / s).clamp(-8, 7).to(torch.int8).reshape(shape)
    assert torch.equal(codes, expected_codes)

    deq = reference.dequantize_groups(codes, scales).reshape(g.shape)
    err = (deq - g).abs()
    unclamped = (codes.reshape(g.shape) > -8) & (codes.reshape(g.shape) < 7)
    bound = s / 2 * (1 + 1e-6)
    assert bool((err <= bound)[unclamped].all())
    # clamped codes only arise at the group's extremes, where the rounded scale is within rounding
    # of absmax/7: the error is still tiny there
    assert bool((err <= bound).all())


def test_quantize_groups_round_half_even():
    """x / s exactly halfway between two integers rounds to the even one (banker's rounding)."""
    vals = [7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 4.5, 5.5, -4.5, -5.5, 6.5, -6.5, 0.0]
    x = torch.tensor(vals * 4, dtype=torch.float32).reshape(1, 64)  # absmax 7 → scale exactly 1
    codes, scales = reference.quantize_groups(x)
    assert scales.item() == 1.0
    expected = [7, 0, 2, 2, 4, 0, -2, -2, -4, 4, 6, -4, -6, 6, -6, 0] * 4
    assert codes.flatten().tolist() == expected


def test_quantize_groups_negative_absmax_clamps_to_minus7():
    """Symmetric grid: a group whose extreme is negative maps it to -7, never -8."""
    x = torch.linspace(-3.5, 1.0, 64).reshape(1, 64)
    codes, scales = reference.quantize_groups(x)
    assert scales.item() == pytest.approx(0.5)
    assert codes.min().item() == -7


@pytest.mark.parametrize("scale_dtype", DTYPES)
def test_quantize_groups_all_zero_group(scale_dtype):
    """An all-zero group gets scale 0 and codes 0, without NaN; other groups are unaffected."""
    x = torch.randn(3, 192, generator=_gen(2))
    x[1, 64:128] = 0.0
    x[2, :] = 0.0
    codes, scales = reference.quantize_groups(x, 64, scale_dtype)
    assert torch.isfinite(scales.float()).all()
    assert scales[1, 1] == 0 and (scales[2] == 0).all()
    assert (codes[1, 64:128] == 0).all() and (codes[2] == 0).all()
    assert (scales[0] > 0).all() and scales[1, 0] > 0 and scales[1, 2] > 0
    deq = reference.dequantize_groups(codes, scales)
    assert torch.isfinite(deq).all()
    assert (deq[2] == 0).all()


@pytest.mark.parametrize("k", [63, 65, 100, 32])
def test_quantize_groups_bad_k(k):
    """K not a multiple of the group size → ValueError naming K."""
    with pytest.raises(ValueError, match=f"K={k}"):
        reference.quantize_groups(torch.randn(2, k))


# ------------------------------------------------------------------------------------- quantize_act


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k", "r"), [(0, 64, 3), (1, 64, 0), (7, 192, 3), (16, 128, 32)])
def test_quantize_act_vs_direct(m, k, r, dtype):
    """quantize_act equals a direct float32 computation, group by group: codes and scales exactly,
    lora_act = (x/λ) @ lora_down within float32 accumulation error of a float64 product."""
    g = _gen(3)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    smooth = (torch.rand(k, generator=g) * 3 + 0.25).to(dtype)
    lora_down = torch.randn(k, r, generator=g).to(dtype)
    q_x, s_x, lora_act = reference.quantize_act(x, smooth, lora_down)
    assert q_x.dtype == torch.uint8 and q_x.shape == (m, k // 2)
    assert s_x.dtype == torch.float32 and s_x.shape == (m, k // 64)
    assert lora_act.dtype == torch.float32 and lora_act.shape == (m, r)

    xh = x.float() / smooth.float()
    codes = reference.unpack_int4(q_x)
    for grp in range(k // 64):
        blk = xh[:, grp * 64 : (grp + 1) * 64]
        s = blk.abs().amax(dim=1, keepdim=True) / 7.0
        assert torch.equal(s_x[:, grp : grp + 1], s)
        q = torch.where(s > 0, torch.round(blk / torch.where(s > 0, s, 1)).clamp(-8, 7), 0)
        assert torch.equal(codes[:, grp * 64 : (grp + 1) * 64], q.to(torch.int8))

    want = xh.double() @ lora_down.double()
    mag = xh.double().abs() @ lora_down.double().abs()
    assert bool(((lora_act.double() - want).abs() <= 1e-5 * mag + 1e-30).all())


# ---------------------------------------------------------------------------------------- gemm_w4a4


def _dense_gemm64(q_x, s_x, q_w, s_w, lora_act, lora_up, bias):
    """The gemm formula in float64 on dequantized operands; also the sum of |terms| per output."""
    groups = s_x.shape[1]
    xd = reference.unpack_int4(q_x).double().reshape(q_x.shape[0], groups, 64) * s_x.double().unsqueeze(-1)
    wd = reference.unpack_int4(q_w).double().reshape(q_w.shape[0], groups, 64) * s_w.double().unsqueeze(-1)
    xd, wd = xd.flatten(1), wd.flatten(1)
    y = xd @ wd.t() + lora_act.double() @ lora_up.double().t()
    mag = xd.abs() @ wd.abs().t() + lora_act.double().abs() @ lora_up.double().abs().t()
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


def _random_gemm_args(m, n, k, r, has_bias, dtype, seed):
    g = _gen(seed)
    q_x = torch.randint(0, 256, (m, k // 2), generator=g, dtype=torch.uint8)
    s_x = torch.rand(m, k // 64, generator=g) * 0.5
    q_w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    s_w = (torch.rand(n, k // 64, generator=g) * 0.02).to(dtype)
    lora_act = torch.randn(m, r, generator=g)
    lora_up = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    return q_x, s_x, q_w, s_w, lora_act, lora_up, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("r", [0, 3, 32])
@pytest.mark.parametrize("k", [64, 192])
@pytest.mark.parametrize("n", [1, 64, 200])
@pytest.mark.parametrize("m", [0, 1, 7, 64])
def test_gemm_w4a4_vs_dense_float64(m, n, k, r, has_bias, dtype):
    """gemm_w4a4 = Σ_g s_x s_w (q_x·q_w) + lora_act @ lora_up.T + bias, evaluated in float64 on the
    dequantized operands, within ``1e-5 * Σ|terms| + u_out * |y|`` (module docstring)."""
    args = _random_gemm_args(m, n, k, r, has_bias, dtype, seed=m * 1000 + n * 10 + k + r)
    y = reference.gemm_w4a4(*args, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    want, mag = _dense_gemm64(*args)
    rel, tiny = OUT_ROUNDOFF[dtype]
    tol = 1e-5 * mag + rel * want.abs() + tiny + 1e-30
    assert bool(((y.double() - want).abs() <= tol).all()), (y.double() - want).abs().max()


def test_gemm_w4a4_uses_each_group_scale():
    """Scaling one group's activation scale changes only that group's contribution (per-group math,
    not a per-row scale)."""
    m, n, k = 4, 8, 192
    q_x, s_x, q_w, s_w, lora_act, lora_up, _ = _random_gemm_args(m, n, k, 0, False, torch.float32, 5)
    y = reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, None, torch.float64)
    s2 = s_x.clone()
    s2[:, 1] *= 2
    y2 = reference.gemm_w4a4(q_x, s2, q_w, s_w, lora_act, lora_up, None, torch.float64)
    qx = reference.unpack_int4(q_x).double()[:, 64:128]
    qw = reference.unpack_int4(q_w).double()[:, 64:128]
    g1 = (qx @ qw.t()) * s_x.double()[:, 1:2] * s_w.double()[:, 1]
    torch.testing.assert_close(y2 - y, g1, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- svdquant_linear

# Relative Frobenius error of the W4A4 linear (λ = 1) against x @ W.T on Gaussian data, measured in
# fp32 / bf16 / fp16 alike (within 0.002): 0.101 (16x128x256, r 32), 0.127 (5x96x128, r 8), 0.203 (a
# single token through a 64x64 layer at rank 0: few terms, large variance). ~1.5x margin on the worst.
LINEAR_REL_ERR = 0.3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "r"), [(16, 128, 256, 32), (5, 96, 128, 8), (1, 64, 64, 0)])
def test_svdquant_linear_approximates_dense(m, n, k, r, dtype):
    """svdquant_linear(x, quantize_weight(W)) ≈ x @ W.T within LINEAR_REL_ERR relative error, and
    it is exactly quantize_act followed by gemm_w4a4."""
    g = _gen(7)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    q = algorithm.quantize_weight(w, r, dtype=dtype)
    y = reference.svdquant_linear(x, *q[:5], bias)
    assert y.dtype == dtype and y.shape == (m, n)
    exact = x.double() @ w.double().t() + bias.double()
    noise = (y.double() - exact).norm() / (x.double() @ w.double().t()).norm()
    assert noise < LINEAR_REL_ERR, noise
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    assert torch.equal(y, reference.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, dtype))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_groups_equals_quantize_then_dequantize(scale_dtype, in_dtype):
    """The one-pass fake quantizer (the smoothing search's) is dequantize(quantize(x)) bit for bit,
    zero groups and values that underflow the scale dtype included; inplace reuses a float32 x."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, 256, generator=g) * torch.rand(3, 40, 1, generator=g) ** 4
    x[0, 0, :64] = 0
    x[1, 2, 64:128] = 1e-30  # scale rounds to 0 in bf16 / fp16
    x = x.to(in_dtype)
    want = reference.dequantize_groups(*reference.quantize_groups(x, 64, scale_dtype))
    before = x.clone()
    got = reference.fake_quantize_groups(x, 64, scale_dtype)
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(x, before)
    y = x.clone()
    got = reference.fake_quantize_groups(y, 64, scale_dtype, inplace=True)
    assert torch.equal(got, want)
    if in_dtype == torch.float32:
        assert got.data_ptr() == y.data_ptr()
    with pytest.raises(ValueError, match="multiple of the group size"):
        reference.fake_quantize_groups(torch.zeros(2, 96))


def test_dequantize_groups_of_an_empty_k():
    # K = 0 (a layer with no inputs): no groups to unpack, an empty result rather than a division by zero.
    assert reference.dequantize_groups(torch.zeros(3, 0, dtype=torch.int8), torch.zeros(3, 0)).shape == (3, 0)
    empty = torch.zeros(3, 0, dtype=torch.uint8)
    assert reference.dequantize_groups_affine(empty, torch.zeros(3, 0), torch.zeros(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("m", [0, 1, 3])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_quantize_fixed16_within_half_a_step(m, scale):
    g = torch.Generator().manual_seed(m)
    xs = torch.randn(m, 4 * reference.GROUP_SIZE, generator=g) * scale
    if m:
        xs[0, 3] *= 1e3  # an outlier: its group's other elements get few steps each
    codes, steps = reference.quantize_fixed16(xs)
    assert codes.dtype == torch.int32 and codes.shape == xs.shape and steps.shape == (m, 4)
    if not m:
        return
    assert codes.abs().max().item() <= reference.FIXED16_MAX
    back = codes.double().reshape(m, 4, -1) * steps.double().unsqueeze(-1)
    amax = xs.double().abs().reshape(m, 4, -1).amax(-1, keepdim=True)
    # Half a step plus float32's rounding of the step and of x̂ · (FIXED16_MAX / amax).
    assert ((back - xs.double().reshape(m, 4, -1)).abs() <= amax * (0.5 / reference.FIXED16_MAX + 2e-7)).all()
    # Each group's largest element is a full-scale code.
    assert (codes.reshape(m, 4, -1).abs().amax(-1) == reference.FIXED16_MAX).all()


def test_quantize_fixed16_is_float32_arithmetic():
    # The same bits as numpy's IEEE float32 division and rounding (half to even), which a kernel reproduces.
    xs = torch.randn(5, 2 * reference.GROUP_SIZE, generator=torch.Generator().manual_seed(1))
    codes, steps = reference.quantize_fixed16(xs)
    g = xs.numpy().reshape(5, 2, -1)
    amax = np.abs(g).max(-1, keepdims=True)
    top = np.float32(reference.FIXED16_MAX)
    assert np.array_equal(codes.numpy().reshape(5, 2, -1), np.rint(g * (top / amax)).astype(np.int32))
    assert np.array_equal(steps.numpy(), (amax / top)[..., 0])
    # Ties go to even: 0.5 and 1.5 steps.
    x = torch.zeros(1, reference.GROUP_SIZE)
    x[0, 0] = reference.FIXED16_MAX
    x[0, 1], x[0, 2] = 0.5, 1.5
    codes, steps = reference.quantize_fixed16(x)
    assert steps.item() == 1.0 and codes[0, :3].tolist() == [reference.FIXED16_MAX, 0, 2]


def test_quantize_fixed16_zero_tiny_and_non_finite_groups():
    x = torch.randn(1, 5 * reference.GROUP_SIZE)
    x[0, :64] = 0
    x[0, 64:128] = 2.0**-101  # below FIXED16_TINY: zero
    x[0, 128:192] = 2.0**-99  # above it: full-scale codes
    x[0, 200] = float("inf")
    x[0, 300] = float("nan")
    codes, steps = reference.quantize_fixed16(x)
    assert steps[0, :2].tolist() == [0.0, 0.0] and not codes[0, :128].any()
    assert (codes[0, 128:192] == reference.FIXED16_MAX).all() and steps[0, 2] == 2.0**-99 / reference.FIXED16_MAX
    assert steps[0, 3:].isnan().all() and not codes[0, 192:].any()
