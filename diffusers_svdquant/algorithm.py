"""SVDQuant's offline math: smoothing, the low-rank branch, INT4 residual quantization, packing.

Everything here works on one linear layer's weight at a time, in float32, and returns the
canonical tensors of DESIGN.md §2. The run-time math (activation quantization and the W4A4 GEMM)
lives in :mod:`diffusers_svdquant.reference`, whose group quantizer is reused here so the two
sides cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference

# Exact SVD of a 3072 x 12288 matrix takes tens of seconds on two cores; a seeded randomized SVD
# with oversampling and power iterations recovers the top-32 subspace to within rounding at a
# small fraction of that. Below this size the exact one is cheap enough.
_EXACT_SVD_MAX_SIDE = 1024
_OVERSAMPLE = 16
_POWER_ITERS = 4
_SVD_SEED = 0
# Smoothing factors are clamped away from 0 and inf: an all-zero input channel (or weight column)
# would otherwise produce a division by zero at run time.
_SMOOTH_MIN = 1e-5
_SMOOTH_MAX = 1e5


class QuantizedWeight(NamedTuple):
    """The canonical tensors of one quantized linear (DESIGN.md §2), bias excluded.

    Attributes:
        qweight: uint8 ``[N, K/2]`` packed INT4 residual codes.
        wscales: ``[N, K/64]`` per-group scales, model dtype.
        smooth: ``[K]`` smoothing vector λ, model dtype.
        lora_down: ``[K, r]``, model dtype.
        lora_up: ``[N, r]``, model dtype.
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor


def smoothing_factors(
    weight: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant-style per-input-channel factors λ.

    ``λ_j = max|X_j|^α / max|W_j|^(1-α)``, clamped to ``[1e-5, 1e5]``. Without activation
    statistics there is nothing to migrate, so ``λ = 1``.

    Args:
        weight: ``[N, K]`` any float dtype.
        act_absmax: ``[K]`` per-input-channel absmax of the layer's input, or None.
        alpha: migration strength in ``[0, 1]``; ``α = 0`` with ``max|W_j| = 1`` is no smoothing.

    Returns:
        float32 ``[K]``.
    """
    k = weight.shape[1]
    if act_absmax is None:
        return torch.ones(k, dtype=torch.float32, device=weight.device)
    if act_absmax.shape != (k,):
        raise ValueError(f"activation statistics have shape {tuple(act_absmax.shape)}, expected [{k}]")
    x = act_absmax.float().to(weight.device).clamp_min(_SMOOTH_MIN)
    w = weight.float().abs().amax(dim=0).clamp_min(_SMOOTH_MIN)
    lam = x.pow(alpha) / w.pow(1.0 - alpha)
    return lam.clamp_(_SMOOTH_MIN, _SMOOTH_MAX)


def low_rank(w: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of ``w`` (truncated SVD), split evenly: ``w ≈ up @ down.T``.

    ``up = U_r sqrt(S_r)``, ``down = V_r sqrt(S_r)``, so neither factor carries the whole dynamic
    range when rounded to 16-bit.

    Args:
        w: float32 ``[N, K]``.
        rank: ``0 <= r <= min(N, K)``.
        method: ``"exact"``, ``"randomized"`` (seeded, deterministic) or ``"auto"``.

    Returns:
        ``(up, down)``: float32 ``[N, r]`` and ``[K, r]``.
    """
    n, k = w.shape
    if rank == 0:
        return w.new_zeros(n, 0), w.new_zeros(k, 0)
    if method == "auto":
        method = "exact" if min(n, k) <= _EXACT_SVD_MAX_SIDE else "randomized"
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].t()
    elif method == "randomized":
        q = min(rank + _OVERSAMPLE, n, k)
        # svd_lowrank draws from the global RNG; fork it so results are reproducible and the
        # caller's random stream is untouched.
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(_SVD_SEED)
            u, s, v = torch.svd_lowrank(w, q=q, niter=_POWER_ITERS)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    else:
        raise ValueError(f"unknown SVD method {method!r}")
    root = s.sqrt()
    return u * root, v * root


def quantize_weight(
    weight: torch.Tensor,
    rank: int,
    *,
    smooth: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    group_size: int = reference.GROUP_SIZE,
    svd_method: str = "auto",
    lowrank_iters: int = 0,
) -> QuantizedWeight:
    """Quantize one linear weight with SVDQuant.

    ``Ŵ = W * λ`` (column-wise); ``L = lora_up @ lora_down.T`` is the rank-``r`` SVD of ``Ŵ``;
    ``R = Ŵ − L`` is quantized to INT4 per group of 64 along K. λ and the low-rank factors are
    rounded to ``dtype`` *before* the residual is formed, so the residual absorbs their rounding
    and the run time sees exactly the tensors the error was computed with. With
    ``lowrank_iters > 0``, ``L ← SVD_r(Ŵ − Q(Ŵ − L))`` is iterated and the best ``L`` by
    ``‖Ŵ − L − Q(Ŵ − L)‖_F`` is kept.

    Args:
        weight: ``[N, K]`` float, K a multiple of ``group_size``.
        rank: ``0 <= r <= min(N, K)`` (0 gives plain W4A4, a baseline).
        smooth: ``[K]`` λ (from :func:`smoothing_factors`), or None for λ = 1.
        dtype: model dtype of the float outputs (default: ``weight.dtype``).
        group_size: 64.
        svd_method: see :func:`low_rank`.
        lowrank_iters: refinement iterations (0 = plain SVD).

    Returns:
        :class:`QuantizedWeight` on ``weight.device``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"weight [{n}, {k}]: in_features K={k} is not a multiple of the group size {group_size}")
    if not 0 <= rank <= min(n, k):
        raise ValueError(f"rank {rank} must be between 0 and min(N, K) = {min(n, k)} for a weight [{n}, {k}]")
    dtype = dtype or weight.dtype
    if smooth is None:
        smooth = torch.ones(k, device=weight.device)
    smooth = smooth.to(dtype)
    # A private float32 copy: the steps below work in place so that quantizing FLUX's largest
    # layer (3072 x 15360) holds about two float32 copies of it, not five.
    w_hat = weight.to(torch.float32, copy=True).mul_(smooth.float().unsqueeze(0))
    if not torch.isfinite(w_hat).all():
        raise ValueError(f"weight [{n}, {k}] has non-finite values after smoothing")

    def factors(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = low_rank(target, rank, svd_method)
        return up.to(dtype), down.to(dtype)

    up, down = factors(w_hat)
    if lowrank_iters == 0:
        residual = w_hat.addmm_(up.float(), down.float().t(), alpha=-1)
        codes, scales = reference.quantize_groups(residual, group_size, dtype)
    else:
        best_err = None
        for it in range(lowrank_iters + 1):
            residual = torch.addmm(w_hat, up.float(), down.float().t(), alpha=-1)
            c, sc = reference.quantize_groups(residual, group_size, dtype)
            err = torch.linalg.vector_norm(residual.sub_(reference.dequantize_groups(c, sc))).item()
            if best_err is None or err < best_err:
                best_err, best = err, (up, down, c, sc)
            if it < lowrank_iters:
                # Ŵ − Q(Ŵ − L) = (Ŵ − L − Q(Ŵ − L)) + L: the buffer already holds the first term.
                up, down = factors(residual.addmm_(up.float(), down.float().t()))
        up, down, codes, scales = best
    return QuantizedWeight(
        qweight=reference.pack_int4(codes),
        wscales=scales,
        smooth=smooth,
        lora_down=down.contiguous(),
        lora_up=up.contiguous(),
    )


def svdquant_weight(
    weight: torch.Tensor,
    rank: int,
    *,
    act_absmax: torch.Tensor | None = None,
    smoothing_alpha: float = 0.5,
    dtype: torch.dtype | None = None,
    svd_method: str = "auto",
    lowrank_iters: int = 0,
) -> QuantizedWeight:
    """:func:`smoothing_factors` then :func:`quantize_weight`: the whole SVDQuant of one weight.

    Args:
        weight: ``[N, K]``.
        rank: low-rank branch rank.
        act_absmax: ``[K]`` calibration absmax of the layer's input, or None (λ = 1).
        smoothing_alpha, dtype, svd_method, lowrank_iters: as in the functions above.
    """
    smooth = smoothing_factors(weight, act_absmax, smoothing_alpha)
    return quantize_weight(
        weight, rank, smooth=smooth, dtype=dtype, svd_method=svd_method, lowrank_iters=lowrank_iters
    )


def dequantize_weight(q: QuantizedWeight) -> torch.Tensor:
    """The float32 weight ``[N, K]`` that a :class:`QuantizedWeight` represents in the original
    (unsmoothed) input space: ``(Q⁻¹(qweight) + lora_up @ lora_down.T) / λ``."""
    residual = reference.dequantize_groups(reference.unpack_int4(q.qweight), q.wscales)
    w_hat = residual + q.lora_up.float() @ q.lora_down.float().t()
    return w_hat / q.smooth.float().unsqueeze(0)
