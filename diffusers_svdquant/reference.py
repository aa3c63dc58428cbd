"""The SVDQuant run-time kernels in plain torch: the specification.

Every native kernel (CPU in ``cpp/cpu``, CUDA in ``cpp/cuda``) must reproduce the integer
codes of these functions exactly (up to rare +-1 rounding ties) and their outputs within the
tolerances the tests state. Nothing here is tuned for speed; it is written to be read.

Conventions shared with ``docs/design.md``:

* INT4 codes are two's complement in ``[-8, 7]``, packed two per byte along K, element ``2j``
  in the low nibble and ``2j + 1`` in the high nibble (:func:`pack_int4`).
* Groups are ``group_size`` (64) consecutive elements along K.
* Activation scales and the low-rank activations are float32; weight scales are stored in the
  model dtype.
* The weight-only (W4A16) layers' codes are *unsigned* in ``[0, 15]`` with a per-group scale and
  minimum (llama.cpp's Q4_1 form, :func:`quantize_groups_affine`), packed the same way.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 64
QMAX = 7
QMIN = -8
UQMAX = 15


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack INT4 codes two per byte along the last dimension.

    Args:
        codes: integer tensor ``[..., K]`` with values in ``[-8, 7]``; K even.

    Returns:
        uint8 ``[..., K/2]``: element ``2j`` in the low nibble, ``2j+1`` in the high nibble.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: uint8 ``[..., K/2]``.

    Returns:
        int8 ``[..., K]`` with values in ``[-8, 7]``.
    """
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    codes = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(codes > 7, codes - 16, codes).to(torch.int8)


def quantize_groups(
    x: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group INT4 quantization along the last dimension.

    ``s = absmax(group) / 7`` (rounded to ``scale_dtype``), ``q = clamp(round_half_even(x / s), -8, 7)``;
    an all-zero group gets scale 0 and codes 0 (no NaN).

    Args:
        x: float tensor ``[..., K]``, K a multiple of ``group_size``; computed in float32.
        group_size: elements per group.
        scale_dtype: dtype the scales are rounded to before the codes are computed, so the codes
            are the best ones for the scales that are kept.

    Returns:
        ``(codes, scales)``: int8 ``[..., K]`` and ``scale_dtype`` ``[..., K/group_size]``.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    g = x.float().reshape(*lead, k // group_size, group_size)
    scales = (g.abs().amax(dim=-1) / QMAX).to(scale_dtype)
    return codes_for_scales(g, scales.float().unsqueeze(-1)).to(torch.int8).reshape(*lead, k), scales


def codes_for_scales(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The symmetric codes of grouped values for given scales: ``clamp(round_half_even(g / s), -8, 7)``, and 0
    where ``s`` is 0 (no NaN).

    Args:
        g: float32 ``[..., G, group]``.
        s: float32 ``[..., G, 1]``, already rounded to the scale dtype.

    Returns:
        float32 ``[..., G, group]`` holding the integer codes.
    """
    zero = s == 0
    return (g / torch.where(zero, torch.ones_like(s), s)).round_().clamp_(QMIN, QMAX).masked_fill_(zero, 0)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 values of per-group INT4 codes.

    Args:
        codes: int8 ``[..., K]``.
        scales: ``[..., K/G]`` any float dtype.

    Returns:
        float32 ``[..., K]``.
    """
    *lead, k = codes.shape
    groups = scales.shape[-1]
    q = codes.float().reshape(*lead, groups, k // groups if groups else GROUP_SIZE)  # K = 0: no groups
    return (q * scales.float().unsqueeze(-1)).reshape(*lead, k)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles of ``packed``: uint8 ``[..., K/2]`` → uint8 ``[..., K]`` in ``[0, 15]``
    (element ``2j`` from the low nibble, as :func:`pack_int4` stores them)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_groups_affine(
    x: torch.Tensor, group_size: int = GROUP_SIZE, param_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group INT4 quantization along the last dimension: ``x ≈ q · s + m``.

    ``m = min(group)`` (rounded to ``param_dtype``), ``s = (max(group) − m) / 15`` (rounded to
    ``param_dtype``), ``q = clamp(round_half_even((x − m) / s), 0, 15)``; a constant group gets
    ``s = 0`` and codes 0 (it is ``m`` exactly). The minimum and scale are rounded *before* the codes
    are chosen, so the codes are the best ones for the parameters that are kept.

    Args:
        x: float tensor ``[..., K]``, K a multiple of ``group_size``; computed in float32.
        group_size: elements per group.
        param_dtype: dtype of the kept scales and minima (the model dtype).

    Returns:
        ``(codes, scales, mins)``: uint8 ``[..., K]`` in ``[0, 15]``, ``param_dtype`` ``[..., K/group_size]`` twice.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    g = x.float().reshape(*lead, k // group_size, group_size)
    lo, hi = torch.aminmax(g, dim=-1)
    mins = lo.to(param_dtype)
    m = mins.float().unsqueeze(-1)
    scales = ((hi - m.squeeze(-1)) / UQMAX).to(param_dtype)
    s = scales.float().unsqueeze(-1)
    zero = s == 0
    q = ((g - m) / torch.where(zero, torch.ones_like(s), s)).round_().clamp_(0, UQMAX).masked_fill_(zero, 0)
    return q.to(torch.uint8).reshape(*lead, k), scales, mins


def dequantize_groups_affine(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Float32 values ``q · s + m`` of per-group unsigned INT4 codes.

    Args:
        codes: uint8 ``[..., K]`` in ``[0, 15]``.
        scales, mins: ``[..., K/G]`` any float dtype.

    Returns:
        float32 ``[..., K]``.
    """
    *lead, k = codes.shape
    groups = scales.shape[-1]
    q = codes.float().reshape(*lead, groups, k // groups if groups else GROUP_SIZE)  # K = 0: no groups
    return (q * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)).reshape(*lead, k)


def effective_weight(
    residual: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor
) -> torch.Tensor:
    """The float32 weight ``[N, K]`` a quantized layer applies to its unsmoothed input (activation quantization
    aside): ``(residual + lora_up @ lora_downᵀ) / smooth`` column-wise.

    Args:
        residual: float32 ``[N, K]``, the dequantized 4-bit residual (a fresh tensor: it is updated in place).
        smooth: ``[K]``; lora_down: ``[K, r]``; lora_up: ``[N, r]`` (``r >= 0``), any float dtype.

    Returns:
        float32 ``[N, K]`` (``residual``'s memory).
    """
    if lora_down.shape[-1]:
        residual = residual.addmm_(lora_up.float(), lora_down.float().t())
    return residual.div_(smooth.float().unsqueeze(0))


def fake_quantize_groups(
    x: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.float32, inplace: bool = False
) -> torch.Tensor:
    """``dequantize_groups(*quantize_groups(x, group_size, scale_dtype))`` in fewer passes over ``x``.

    The same scales, the same division, rounding and clamping, then the multiplication back: equal
    to the two-step form bit for bit (tested), without the int8 codes in between. For the
    smoothing search, which fake-quantizes batches of whole weights.

    Args:
        x: float ``[..., K]``, K a multiple of ``group_size``.
        inplace: reuse ``x``'s memory for the result when ``x`` is float32 (``x`` is then overwritten).

    Returns:
        float32 ``[..., K]``.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    # x.float() is x itself for float32 input: divide in place only when that is allowed.
    may_overwrite = inplace or x.dtype != torch.float32
    g = x.float().reshape(*lead, k // group_size, group_size)
    lo, hi = torch.aminmax(g, dim=-1)
    s = (torch.maximum(hi, lo.neg_()) / QMAX).to(scale_dtype).float().unsqueeze(-1)
    zero = s == 0
    d = torch.where(zero, torch.ones_like(s), s)
    q = g.div_(d) if may_overwrite else g / d
    return q.round_().clamp_(QMIN, QMAX).masked_fill_(zero, 0).mul_(s).reshape(*lead, k)


def quantize_act(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth, quantize and down-project activations (one read of ``x`` in the kernels).

    ``x̂ = x / smooth`` in float32; per token and group ``s_x = absmax(x̂) / 7`` (float32),
    ``q_x = clamp(round_half_even(x̂ / s_x), -8, 7)``; ``lora_act = x̂ @ lora_down`` in float32.

    Args:
        x: ``[M, K]`` float32 / bfloat16 / float16.
        smooth: ``[K]`` the smoothing vector λ (any float dtype).
        lora_down: ``[K, r]`` (any float dtype), ``r >= 0``.
        group_size: 64.

    Returns:
        ``(q_x, s_x, lora_act)``: uint8 ``[M, K/2]`` packed codes, float32 ``[M, K/G]``,
        float32 ``[M, r]``.
    """
    xs = x.float() / smooth.float()
    codes, scales = quantize_groups(xs, group_size, torch.float32)
    lora_act = xs @ lora_down.float()
    return pack_int4(codes), scales, lora_act


def gemm_w4a4(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    q_w: torch.Tensor,
    s_w: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W4A4 per-group GEMM with the low-rank epilogue.

    ``y[m, n] = Σ_g s_x[m,g] s_w[n,g] (q_x[m,g,:] · q_w[n,g,:]) + lora_act[m] · lora_up[n] + bias[n]``.
    Each per-group integer dot product is exact (|q| <= 8, 64 terms, so float32 holds it exactly);
    scaling and accumulation over groups are float32.

    Args:
        q_x: uint8 ``[M, K/2]``.
        s_x: float32 ``[M, K/G]``.
        q_w: uint8 ``[N, K/2]``.
        s_w: ``[N, K/G]`` model dtype.
        lora_act: float32 ``[M, r]``.
        lora_up: ``[N, r]`` model dtype.
        bias: ``[N]`` or None.
        out_dtype: dtype of the result.

    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    groups = s_x.shape[-1]
    qx = unpack_int4(q_x).float()
    qw = unpack_int4(q_w).float()
    m, k = qx.shape
    n = qw.shape[0]
    gs = k // groups if groups else 0
    sx = s_x.float()
    sw = s_w.float()
    y = lora_act.float() @ lora_up.float().t()
    for g in range(groups):
        sl = slice(g * gs, (g + 1) * gs)
        y += (qx[:, sl] @ qw[:, sl].t()) * sx[:, g : g + 1] * sw[:, g].unsqueeze(0)
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype).reshape(m, n)


def svdquant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int = GROUP_SIZE,
) -> torch.Tensor:
    """A whole SVDQuant linear on 2-D input: :func:`quantize_act` then :func:`gemm_w4a4`.

    Args:
        x: ``[M, K]``; the result has ``x.dtype``.
        qweight, wscales, smooth, lora_down, lora_up, bias: the canonical tensors (docs/design.md §2).

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    q_x, s_x, lora_act = quantize_act(x, smooth, lora_down, group_size)
    return gemm_w4a4(q_x, s_x, qweight, wscales, lora_act, lora_up, bias, x.dtype)


def linear_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wmins: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A weight-only (W4A16) linear: 16-bit activations times 4-bit weights, plus the low-rank branch.

    ``x̂ = x / smooth`` in float32; ``W[n, k] = q[n, k] · wscales[n, g] + wmins[n, g]`` (``g = k // 64``,
    codes unsigned, :func:`quantize_groups_affine`); ``y = x̂ Wᵀ + (x̂ @ lora_down) @ lora_upᵀ + bias``,
    all in float32, rounded once to ``x.dtype``. Kernels may sum in another order (per group
    ``s · (x̂_g · q_g) + m · Σ x̂_g``); the tests state the tolerance.

    Args:
        x: ``[M, K]`` float32 / bfloat16 / float16.
        qweight: uint8 ``[N, K/2]`` unsigned codes, packed as :func:`pack_int4` packs.
        wscales, wmins: ``[N, K/64]`` model dtype.
        smooth: ``[K]`` activation-aware scaling λ (ones when uncalibrated).
        lora_down: ``[K, r]``; lora_up: ``[N, r]`` (``r >= 0``); bias: ``[N]`` or None.

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    xs = x.float() / smooth.float()
    w = dequantize_groups_affine(unpack_uint4(qweight), wscales, wmins)
    y = xs @ w.t()
    if lora_down.shape[-1]:
        y += (xs @ lora_down.float()) @ lora_up.float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


# x̂ in 16-bit fixed point per row and group of 64, as the bfloat16 W4A16 GEMV of the x86 CPU paths multiplies it
# (cpp/cpu/w4a16_gemv_bf16.cpp: the codes' unsigned bytes against x̂'s two signed bytes with vpdpbusd).
# FIXED16_MAX = 127·256 + 127: the largest integer i whose bytes h, l in i = 256·h + l are both int8.
FIXED16_MAX = 32639
# Groups whose largest |x̂| is below this count as zero (32639 / amax would overflow float32 near 2^-113).
FIXED16_TINY = 2.0**-100


def quantize_fixed16(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ in 16-bit fixed point per row and group of 64: ``x̂ ≈ codes · step``.

    Per group, ``amax = max |x̂|``, ``codes = round(x̂ · (FIXED16_MAX / amax))`` (half to even) and
    ``step = amax / FIXED16_MAX``, every operation in float32: a kernel computes the same bits. A group with
    ``amax < FIXED16_TINY`` gets codes 0 and step 0; one with an infinite or NaN element codes 0 and step NaN
    (its outputs are NaN). The error is at most half a step, ``amax / 65278`` (about ``amax · 2⁻¹⁶``), plus
    float32's rounding of ``x̂ · (FIXED16_MAX / amax)``.

    Args:
        xs: float32 ``[M, K]``, K a multiple of 64.

    Returns:
        ``(codes, steps)``: int32 ``[M, K]`` in ``[-FIXED16_MAX, FIXED16_MAX]``, float32 ``[M, K/64]``.
    """
    m, k = xs.shape
    g = xs.float().reshape(m, k // GROUP_SIZE, GROUP_SIZE)
    amax = g.abs().amax(-1, keepdim=True)  # NaN if any element is
    finite = amax <= torch.finfo(torch.float32).max
    live = finite & (amax >= FIXED16_TINY)
    safe = torch.where(live, amax, torch.ones_like(amax))
    top = torch.full_like(safe, FIXED16_MAX)
    # Tensor by tensor: a Python number over a tensor multiplies by the reciprocal, not the IEEE quotient.
    codes = torch.where(live, torch.round(g * (top / safe)), torch.zeros_like(g)).to(torch.int32)
    steps = torch.where(live, safe / top, torch.where(finite, 0.0, float("nan")))
    return codes.reshape(m, k), steps.squeeze(-1)


# The packed XᵀX of calibration (calibration/packed.py): the upper triangle of a symmetric K x K matrix in row
# blocks of PACK_ROWS rows (block: rows [r0, r1), columns [r0, K), row-major), one after another in a flat vector.
PACK_ROWS = 256
# Fixed-point XᵀX (calibration/fixedpoint.py): every unit of an item, and every partial diagonal, stays below this
# (an int: the integers are compared exactly, not through a float32 promotion).
FIXED_POINT_LIMIT = 2**62


def packed_row_blocks(k: int) -> list[tuple[int, int, int]]:
    """``(r0, r1, offset)`` of each row block of a packed ``K x K`` upper triangle: block rows ``[r0, r1)``,
    columns ``[r0, K)``, row-major from ``offset``."""
    out, offset = [], 0
    for r0 in range(0, k, PACK_ROWS):
        r1 = min(k, r0 + PACK_ROWS)
        out.append((r0, r1, offset))
        offset += (r1 - r0) * (k - r0)
    return out


def pack_blocks(packed: torch.Tensor, k: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(r0, r1, view)`` of each row block of a packed ``K x K`` upper triangle ``packed``: ``view``
    ``[r1 − r0, K − r0]`` holds rows ``[r0, r1)``, columns ``[r0, K)``."""
    return [(r0, r1, packed[o : o + (r1 - r0) * (k - r0)].view(r1 - r0, k - r0)) for r0, r1, o in packed_row_blocks(k)]


def packed_size(k: int) -> int:
    """Entries of a packed ``K x K`` upper triangle (:func:`packed_row_blocks`): about ``K²/2 + 128·K``."""
    return sum((r1 - r0) * (k - r0) for r0, r1, _ in packed_row_blocks(k))


def fixed_point_shift(exponents: torch.Tensor, offset: int, r0: int, r1: int) -> torch.Tensor:
    """``−(s_j + s_l + o)`` for rows ``[r0, r1)``, columns ``[r0, K)`` of a packed row block (int64, on the
    exponents' device): an item's value · 2^shift is its value in fixed-point units."""
    return -offset - exponents[r0:r1, None] - exponents[None, r0:]


def fixed_point_add(ints: torch.Tensor, item: torch.Tensor, exponents: torch.Tensor, offset: int) -> bool:
    """Add one packed float32 ``XᵀX`` item to its int64 fixed-point sum, in place: entry ``(j, l)`` gains
    ``round(item_jl · 2^−(s_j + s_l + o))``, rounded half to even from the exact float64 product (a power of two
    scales a float64 exactly). The kernel of :class:`~diffusers_svdquant.calibration.fixedpoint.FixedPointSum`.

    Args:
        ints: int64 ``[P]``, ``P = packed_size(K)``, the sum, updated.
        item: float32 ``[P]``, finite (the caller checks), on the device of ``ints``.
        exponents: int64 ``[K]``, ``s_j``, on the device of ``ints``.
        offset: ``o``.

    Returns:
        Whether every entry's units were below ``2^62`` in magnitude and every diagonal entry of the updated sum
        is below ``2^62``. When False the integers are unspecified: the caller drops the sum or raises.
    """
    k = exponents.numel()
    fits = torch.ones((), dtype=torch.bool, device=ints.device)
    for (r0, r1, block), (_, _, acc) in zip(pack_blocks(item, k), pack_blocks(ints, k), strict=True):
        units = torch.round(torch.ldexp(block.double(), fixed_point_shift(exponents, offset, r0, r1)))  # half to even
        fits &= (units.abs() < FIXED_POINT_LIMIT).all()
        acc += units.long()
        fits &= (acc.diagonal() < FIXED_POINT_LIMIT).all()
    return bool(fits)
