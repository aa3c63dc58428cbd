"""How the codes of a quantized residual are chosen: least-squares refitted weight-only groups and GPTQ.

:mod:`diffusers_svdquant.algorithm` calls these (and re-exports them); both return the canonical
codes and parameters of :mod:`diffusers_svdquant.reference`, only better chosen than plain
round-to-nearest.
"""

from __future__ import annotations

import torch

from . import reference

# GPTQ: the Hessian's diagonal is raised by a fraction of its mean: Frantar et al.'s 1% with well-sampled
# inputs, more when the calibration rows barely outnumber the columns (XᵀX near rank-deficient, its small
# eigenvalues noise): max(0.01, 0.1 · K / rows). Measured on real MiniLM (README, calibration), 960 rows on
# K = 384 / 1536, held-out mean cosine: 0.01 -> 0.9715, 0.1 · K / rows -> 0.9757, 0.25 -> 0.9749, 0.5 -> 0.9741.
# FLUX calibration sees thousands of rows per call, where this is 0.01.
GPTQ_DAMP = 0.01
GPTQ_DAMP_PER_COLUMN = 0.1


def gptq_damping(k: int, rows: int | None) -> float:
    """GPTQ's relative damping for a ``[K, K]`` ``XᵀX`` summed over ``rows`` input rows (None: unknown)."""
    if not rows:
        return GPTQ_DAMP
    return max(GPTQ_DAMP, GPTQ_DAMP_PER_COLUMN * k / rows)


# Columns go in blocks of this many (a multiple of the group, so a group's scale is set inside a block).
_GPTQ_BLOCK = 128


def gptq_quantize_groups(
    residual: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = reference.GROUP_SIZE,
    scale_dtype: torch.dtype = torch.float32,
    damp: float = GPTQ_DAMP,
    affine: bool = False,
    shrinks: tuple[float, ...] = (1.0,),
    overwrite_hessian: bool = False,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`reference.quantize_groups` with GPTQ's error compensation (Frantar et al., 2022).

    Columns are quantized left to right; each one's rounding error is spread over the columns not yet
    quantized, weighted by the inverse Hessian, so the layer *output* error ``‖X R − X Q(R)‖`` shrinks
    rather than the weight error. A group's scale is ``absmax / 7`` of its columns as they stand when
    the group is reached (after the earlier groups' corrections); codes are clamped to ``[-8, 7]``.
    The result is in the canonical format: only the codes and scales differ from round-to-nearest.

    Args:
        residual: float ``[N, K]`` to quantize, K a multiple of ``group_size``.
        hessian: ``[K, K]`` ``XᵀX`` of the inputs the layer sees (the same space as ``residual``'s columns).
        group_size: elements per group.
        scale_dtype: dtype the scales are rounded to before the codes are chosen.
        damp: the diagonal is raised by ``damp · mean(diag)`` so the inverse exists.
        shrinks: each symmetric group's scale is the best of these fractions of its absmax / 7, by its error
            weighted with the group's ``XᵀX`` block (:func:`search_group_scales`); ``(1.0,)``: absmax / 7.
        overwrite_hessian: ``hessian`` (float32, on the residual's device) may be written over and freed here:
            the caller holds no other reference it still needs.
        act_order: symmetric codes only: quantize the columns by decreasing ``diag(XᵀX)`` with every group's scale
            fixed beforehand from the residual as it is (GPTQ's act-order with static groups). Off by default:
            on real MiniLM it measured +0.002 / −0.0005 held-out cosine with 960 / 1,920 calibration rows.
        affine: round to the unsigned ``q · s + m`` grid of :func:`reference.quantize_groups_affine`
            (weight-only layers) instead; a group's ``m`` and ``s`` come from its columns' min and max as
            they stand when the group is reached.

    Returns:
        ``(codes, scales, mins)``: int8 ``[N, K]`` in ``[-8, 7]`` (uint8 in ``[0, 15]`` when ``affine``),
        ``scale_dtype`` ``[N, K/group_size]``, and the minima like the scales when ``affine``, else None.
    """
    n, k = residual.shape
    if k % group_size or hessian.shape != (k, k):
        raise ValueError(f"gptq: residual [{n}, {k}] needs K % {group_size} == 0 and a [{k}, {k}] Hessian, "
                         f"got {list(hessian.shape)}")  # fmt: skip
    w = residual.to(torch.float32, copy=True)
    h = hessian.to(device=w.device, dtype=torch.float32, copy=not overwrite_hessian)
    del hessian  # with overwrite_hessian its buffer is h's; the caller has let go of it
    hblocks = group_hessian_blocks(h, group_size) if len(shrinks) > 1 and not affine else None
    dead = h.diagonal() <= 0  # inputs that were always 0: their weights never reach the output
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    perm = col_scale = None
    if act_order and not affine:
        # Columns by decreasing XᵀX diagonal (the inputs that matter most first) with static group scales, chosen
        # from the residual as it is: a group's columns are no longer contiguous in the order of quantization.
        fixed = search_group_scales(w, group_size, scale_dtype, hblocks, shrinks)[1] if hblocks is not None else (
            reference.quantize_groups(w, group_size, scale_dtype)[1])  # fmt: skip
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h, w = h[perm][:, perm], w[:, perm]
        col_scale = fixed.float()[:, perm // group_size]
    # The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row j holds what column j's error does to the later
    # columns. With H = R Rᵀ, R upper (the lower factor of H reversed, reversed back), U = R⁻¹: one
    # factorization and one triangular solve instead of factorizing H and then H⁻¹ (25% less on K = 12,288).
    # The factorization and the solve write over their inputs and each buffer is dropped once used: at most
    # two K x K buffers live here (plus the caller's XᵀX unless overwrite_hessian), where forming every
    # result anew held five (2.8 GiB at K = 12,288).
    flipped = h.flip(0, 1)
    del h
    factor = torch.linalg.cholesky(flipped, out=flipped).flip(0, 1)
    del flipped
    u = torch.eye(k, device=w.device)
    torch.linalg.solve_triangular(factor, u, upper=True, out=u)
    del factor
    codes = torch.empty(n, k, dtype=torch.uint8 if affine else torch.int8, device=w.device)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype, device=w.device)
    mins = torch.zeros_like(scales) if affine else None
    qmin, qmax = (0, reference.UQMAX) if affine else (reference.QMIN, reference.QMAX)
    m = torch.zeros(n, device=w.device)
    block = max(group_size, _GPTQ_BLOCK // group_size * group_size)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, errs = w[:, b0:b1].clone(), torch.empty(n, b1 - b0, device=w.device)
        for j in range(b1 - b0):
            if col_scale is not None:
                s = col_scale[:, b0 + j]
                zero = s == 0
                d = torch.where(zero, torch.ones_like(s), s)
            elif j % group_size == 0:
                g = (b0 + j) // group_size
                if affine:  # the same parameters reference.quantize_groups_affine picks for these columns
                    lo, hi = torch.aminmax(wb[:, j : j + group_size], dim=1)
                    mins[:, g] = lo.to(scale_dtype)
                    m = mins[:, g].float()
                    s = ((hi - m) / reference.UQMAX).to(scale_dtype)
                elif hblocks is not None:
                    s = search_group_scales(wb[:, j : j + group_size], group_size, scale_dtype, hblocks[g : g + 1],
                                            shrinks)[1][:, 0]  # fmt: skip
                else:
                    s = (wb[:, j : j + group_size].abs().amax(dim=1) / reference.QMAX).to(scale_dtype)
                scales[:, g] = s
                s = s.float()
                zero = s == 0
                d = torch.where(zero, torch.ones_like(s), s)
            q = ((wb[:, j] - m) / d).round_().clamp_(qmin, qmax).masked_fill_(zero, 0)
            codes[:, b0 + j] = q.to(codes.dtype)
            err = (wb[:, j] - q * s - m) / u[b0 + j, b0 + j]
            wb[:, j:].sub_(err.unsqueeze(1) * u[b0 + j, b0 + j : b1].unsqueeze(0))
            errs[:, j] = err
        w[:, b1:].sub_(errs @ u[b0:b1, b1:])
    if perm is not None:
        codes[:, perm] = codes.clone()
        scales = fixed
    return codes, scales, mins


# Per-group scale search: each group's scale is tried at these fractions of absmax / 7 (clipping the largest
# values to round the rest more finely, as AWQ's and llama.cpp's weight quantizers do).
SCALE_SHRINKS = tuple(round(1.0 - 0.05 * i, 2) for i in range(7))


def group_hessian_blocks(hessian: torch.Tensor, group_size: int = reference.GROUP_SIZE) -> torch.Tensor:
    """The diagonal ``[group, group]`` blocks of a ``[K, K]`` ``XᵀX``: float32 ``[K/group, group, group]``."""
    k = hessian.shape[0]
    blocks = hessian.float().reshape(k // group_size, group_size, k // group_size, group_size)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def search_group_scales(
    x: torch.Tensor,
    group_size: int = reference.GROUP_SIZE,
    scale_dtype: torch.dtype = torch.float32,
    blocks: torch.Tensor | None = None,
    shrinks: tuple[float, ...] = SCALE_SHRINKS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference.quantize_groups` with each group's scale chosen among ``shrink · absmax / 7``.

    A group's error ``e = x − q·s`` is scored as ``eᵀ H_g e`` with ``H_g`` its ``[group, group]`` block of the
    inputs' ``XᵀX`` (its share of the layer-output error ``‖X e‖²``, cross-group terms left out), or as ``eᵀe``
    without ``blocks``. Ties keep the larger scale, so ``shrinks = (1.0,)`` is round-to-nearest.

    Args:
        x: float ``[N, K]``.
        blocks: float32 ``[K/group, group, group]`` from :func:`group_hessian_blocks`, or None.
        shrinks: fractions of ``absmax / 7`` tried, the first kept on ties.

    Returns:
        ``(codes, scales)`` as :func:`reference.quantize_groups` returns them.
    """
    n, k = x.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    codes = torch.empty(n, k, dtype=torch.int8, device=x.device)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype, device=x.device)
    # Row blocks of ~1 MiB of float32: the passes per candidate run from cache (3x faster on [3072, 12288]).
    step = max(1, (1 << 18) // k)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        codes[r0:r1], scales[r0:r1] = _best_scales(x[r0:r1], group_size, scale_dtype, blocks, shrinks)
    return codes, scales


def _best_scales(x, group_size, scale_dtype, blocks, shrinks):
    n, k = x.shape
    g = x.float().reshape(n, k // group_size, group_size)
    amax = g.abs().amax(dim=-1)
    best_err = best_s = best_q = None
    for f in shrinks:
        s = (amax * f / reference.QMAX).to(scale_dtype)
        sf = s.float().unsqueeze(-1)
        q = reference.codes_for_scales(g, sf)
        e = torch.addcmul(g, q, sf, value=-1)
        if blocks is None:
            err = torch.linalg.vecdot(e, e)
        else:  # [G, rows, group] @ [G, group, group]: each group's eᵀ H_g e
            et = e.transpose(0, 1)
            err = torch.linalg.vecdot(torch.bmm(et, blocks), et).t()
        if best_err is None:
            best_err, best_s, best_q = err, s, q
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_q = torch.where(better.unsqueeze(-1), q, best_q)
    return best_q.reshape(n, k).to(torch.int8), best_s


# Least-squares refits of a weight-only group's (scale, min) after min-max rounding. Measured on
# Gaussian [3072, 3072] weights (bf16 parameters): squared error 0.944 / 0.916 / 0.901 / 0.890 of
# min-max's after 1 / 2 / 3 / 5 refits; 3 is where the gain flattens.
_AFFINE_REFITS = 3


def affine_groups(
    x: torch.Tensor, group_size: int = reference.GROUP_SIZE, param_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight-only INT4 codes, scales and minima with a lower error than min-max rounding.

    Starts from :func:`reference.quantize_groups_affine` (min-max); then, per group, refits ``(s, m)``
    by least squares to the values given the codes (``s = cov(q, x) / var(q)``, ``m = mean(x) − s·mean(q)``),
    rounds them to ``param_dtype``, re-rounds the codes, and keeps whichever parameters gave the
    group the smallest squared error (the result is never worse than min-max's). The format is the same.

    Args:
        x: float ``[..., K]``, K a multiple of ``group_size``.
        param_dtype: dtype of the scales and minima.

    Returns:
        ``(codes, scales, mins)`` as :func:`reference.quantize_groups_affine` returns them.
    """
    *lead, k = x.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    rows = x.reshape(-1, k)
    codes = torch.empty(rows.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows.shape[0], k // group_size, dtype=param_dtype, device=x.device)
    mins = torch.empty_like(scales)
    # Row blocks of ~2 MiB of float32: the dozen passes over each block run from cache (2x faster than whole
    # weights on FLUX's 18432 x 3072 AdaLN linear).
    step = max(1, (1 << 19) // k)
    for r0 in range(0, rows.shape[0], step):
        r1 = min(r0 + step, rows.shape[0])
        codes[r0:r1], scales[r0:r1], mins[r0:r1] = _refit_block(rows[r0:r1], group_size, param_dtype)
    return codes.reshape(*lead, k), scales.reshape(*lead, -1), mins.reshape(*lead, -1)


def _refit_block(x: torch.Tensor, group_size: int, param_dtype: torch.dtype):
    codes, scales, mins = reference.quantize_groups_affine(x, group_size, param_dtype)
    g = x.float().reshape(x.shape[0], -1, group_size)
    codes = codes.reshape(g.shape)
    q = codes.float()

    def sq_error(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        e = torch.addcmul(m.float().unsqueeze(-1) - g, q, s.float().unsqueeze(-1))
        return torch.linalg.vecdot(e, e)

    best = sq_error(q, scales, mins)
    mean_x = g.mean(-1)
    for _ in range(_AFFINE_REFITS):
        mean_q = q.mean(-1)
        dq = q - mean_q.unsqueeze(-1)
        var = torch.linalg.vecdot(dq, dq)
        s = torch.where(var > 0, torch.linalg.vecdot(dq, g) / var.clamp_min(1e-30), scales.float()).to(param_dtype)
        m = (mean_x - s.float() * mean_q).to(param_dtype)
        sf, mf = s.float().unsqueeze(-1), m.float().unsqueeze(-1)
        # Any codes are valid for the kept (s, m): multiplying by 1/s instead of dividing changes only which
        # ties round where, and the error check below keeps a group's codes only if they are better.
        inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
        q = torch.addcmul(-mf * inv, g, inv).round_().clamp_(0, reference.UQMAX)
        err = sq_error(q, s, m)
        better = err < best
        best = torch.where(better, err, best)
        scales, mins = torch.where(better, s, scales), torch.where(better, m, mins)
        codes[better] = q[better].to(torch.uint8)
    return codes.reshape(x.shape), scales, mins
