"""SVDQuant's offline math: smoothing, the low-rank branch, INT4 residual quantization, packing
(how the residual's codes are chosen, GPTQ and the weight-only refit, is in :mod:`.rounding`).

Everything here works on one linear layer's weight at a time, in float32, and returns the
canonical tensors of docs/design.md §2. The run-time math (activation quantization and the W4A4 GEMM)
lives in :mod:`diffusers_svdquant.reference`, whose group quantizer is reused here so the two
sides cannot drift apart.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import reference

# Re-exported: callers reach all the weight-side math through this module.
from .rounding import (  # noqa: F401
    GPTQ_DAMP,
    SCALE_SHRINKS,
    affine_groups,
    gptq_damping,
    gptq_quantize_groups,
    group_hessian_blocks,
    search_group_scales,
)

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
    """The canonical tensors of one quantized linear (docs/design.md §2), bias excluded.

    Attributes:
        qweight: uint8 ``[N, K/2]`` packed INT4 residual codes.
        wscales: ``[N, K/64]`` per-group scales, model dtype.
        smooth: ``[K]`` smoothing vector λ, model dtype.
        lora_down: ``[K, r]``, model dtype.
        lora_up: ``[N, r]``, model dtype.
        wmins: ``[N, K/64]`` per-group minima of a weight-only (W4A16) layer, model dtype; its codes are
            then unsigned (``reference.quantize_groups_affine``). None for W4A4 (symmetric codes).
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    wmins: torch.Tensor | None = None


def smoothing_factors(
    weight: torch.Tensor, act_absmax: torch.Tensor | None, alpha: float = 0.5, beta: float | None = None
) -> torch.Tensor:
    """SmoothQuant-style per-input-channel factors λ.

    ``λ_j = max|X_j|^α / max|W_j|^β`` with ``β = 1 − α`` unless given, clamped to ``[1e-5, 1e5]``.
    ``α = β = 0`` is no smoothing (``λ = 1``). Without activation statistics there is nothing to
    migrate, so ``λ = 1``.

    Args:
        weight: ``[N, K]`` any float dtype.
        act_absmax: ``[K]`` per-input-channel absmax of the layer's input, or None.
        alpha: migration strength in ``[0, 1]``.
        beta: exponent of the weight absmax in ``[0, 1]``; None for ``1 − α``.

    Returns:
        float32 ``[K]``.
    """
    k = weight.shape[1]
    if act_absmax is None:
        return torch.ones(k, dtype=torch.float32, device=weight.device)
    if act_absmax.shape != (k,):
        raise ValueError(f"activation statistics have shape {tuple(act_absmax.shape)}, expected [{k}]")
    beta = 1.0 - alpha if beta is None else beta
    x = act_absmax.float().to(weight.device).clamp_min(_SMOOTH_MIN)
    w = weight.float().abs().amax(dim=0).clamp_min(_SMOOTH_MIN)
    lam = x.pow(alpha) / w.pow(beta)
    return lam.clamp_(_SMOOTH_MIN, _SMOOTH_MAX)


@contextlib.contextmanager
def _one_thread():
    """Run LAPACK's SVD of a small matrix on one thread. Its many short parallel regions wait on every thread:
    on a loaded 2-core machine (load 4-7) a 128 x 512 SVD took 2.1 s on 2 threads and 0.01 s on 1, 1024 x 4096
    26.6 s and 5.9 s; ``lowrank_iters`` runs it four times per layer. CPU only: a GPU SVD is unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def low_rank(w: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of ``w`` (truncated SVD), split evenly: ``w ≈ up @ down.T``.

    ``up = U_r sqrt(S_r)``, ``down = V_r sqrt(S_r)``, so neither factor carries the whole dynamic
    range when rounded to 16-bit.

    Args:
        w: float32 ``[N, K]``, or a batch ``[B, N, K]`` (each factored on its own; the randomized
            method draws one seeded test matrix for the whole batch, so a result depends on the
            batch's shape, never on the run).
        rank: ``0 <= r <= min(N, K)``.
        method: ``"exact"``, ``"randomized"`` (seeded, deterministic) or ``"auto"``.

    Returns:
        ``(up, down)``: float32 ``[..., N, r]`` and ``[..., K, r]``.
    """
    *lead, n, k = w.shape
    if rank == 0:
        return w.new_zeros(*lead, n, 0), w.new_zeros(*lead, k, 0)
    if method == "auto":
        method = "exact" if min(n, k) <= _EXACT_SVD_MAX_SIDE else "randomized"
    if method == "exact":
        with _one_thread():
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].mT
    elif method == "randomized":
        q = min(rank + _OVERSAMPLE, n, k)
        # svd_lowrank draws from the global RNG; fork it so results are reproducible and the
        # caller's random stream is untouched.
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(_SVD_SEED)
            u, s, v = torch.svd_lowrank(w, q=q, niter=_POWER_ITERS)
        u, s, v = u[..., :rank], s[..., :rank], v[..., :rank]
    else:
        raise ValueError(f"unknown SVD method {method!r}")
    root = s.sqrt().unsqueeze(-2)
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
    hessian: torch.Tensor | None = None,
    weight_only: bool = False,
    hessian_rows: int | None = None,
    scale_search: bool = True,
    gptq_damp: float | None = None,
) -> QuantizedWeight:
    """Quantize one linear weight with SVDQuant.

    ``Ŵ = W * λ`` (column-wise); ``L = lora_up @ lora_down.T`` is the rank-``r`` SVD of ``Ŵ``;
    ``R = Ŵ − L`` is quantized to INT4 per group of 64 along K. λ and the low-rank factors are
    rounded to ``dtype`` *before* the residual is formed, so the residual absorbs their rounding
    and the run time sees exactly the tensors the error was computed with. With
    ``lowrank_iters > 0``, ``L ← SVD_r(Ŵ − Q(Ŵ − L))`` is iterated and the best ``L`` by
    ``‖Ŵ − L − Q(Ŵ − L)‖_F`` is kept (scoring it by the output error with ``hessian`` instead chose the same
    branches on real MiniLM: 0.9776 mean cosine either way).

    Args:
        weight: ``[N, K]`` float, K a multiple of ``group_size``.
        rank: ``0 <= r <= min(N, K)`` (0 gives plain W4A4, a baseline).
        smooth: ``[K]`` λ (from :func:`smoothing_factors`), or None for λ = 1.
        dtype: model dtype of the float outputs (default: ``weight.dtype``).
        group_size: 64.
        svd_method: see :func:`low_rank`.
        lowrank_iters: refinement iterations (0 = plain SVD).
        hessian: ``[K, K]`` ``XᵀX`` of the layer's (unsmoothed) calibration inputs, or None. When given,
            the final residual is rounded by :func:`gptq_quantize_groups` against the smoothed inputs'
            ``diag(1/λ) XᵀX diag(1/λ)`` instead of to nearest.
        weight_only: quantize the residual for a weight-only (W4A16) layer: unsigned codes with a
            per-group scale and minimum (:func:`reference.quantize_groups_affine`), which the 16-bit
            activations can afford (:func:`affine_groups`); :attr:`QuantizedWeight.wmins` is then set.
        hessian_rows: how many input rows ``hessian`` sums (sets GPTQ's damping, :func:`gptq_damping`).
        scale_search: W4A4 residual groups take the scale among :data:`SCALE_SHRINKS` ``· absmax / 7`` with
            the smallest error (weighted by ``hessian``'s group blocks when given; :func:`search_group_scales`),
            inside GPTQ too; False: ``absmax / 7`` (round-to-nearest). Weight-only layers refit instead.
        gptq_damp: GPTQ's relative damping, overriding :func:`gptq_damping`.

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

    # The smoothed inputs' XᵀX, diag(1/λ) H diag(1/λ), in one private buffer that GPTQ then writes over (K x K
    # float32 is 576 MiB at K = 12,288: no second copy).
    held: dict[str, torch.Tensor] = {}
    if hessian is not None:
        inv = 1.0 / smooth.float().to(weight.device)
        held["h"] = hessian.to(device=weight.device, dtype=torch.float32, copy=True)
        held["h"].mul_(inv.unsqueeze(0)).mul_(inv.unsqueeze(1))
    shrinks = SCALE_SHRINKS if scale_search else (1.0,)
    blocks = group_hessian_blocks(held["h"], group_size) if held and scale_search else None

    def round_nearest(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if weight_only:
            return affine_groups(residual, group_size, dtype)
        if scale_search:
            return (*search_group_scales(residual, group_size, dtype, blocks, shrinks), None)
        return (*reference.quantize_groups(residual, group_size, dtype), None)

    def round_residual(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not held:
            return round_nearest(residual)
        damp = gptq_damping(k, hessian_rows) if gptq_damp is None else gptq_damp
        return gptq_quantize_groups(residual, held.pop("h"), group_size, dtype, damp, weight_only, shrinks,
                                    overwrite_hessian=True)  # fmt: skip

    up, down = factors(w_hat)
    if lowrank_iters == 0 or rank == 0:  # rank 0: no branch to refine
        codes, scales, mins = round_residual(w_hat.addmm_(up.float(), down.float().t(), alpha=-1))
    else:
        best_err = None
        for it in range(lowrank_iters + 1):
            residual = torch.addmm(w_hat, up.float(), down.float().t(), alpha=-1)
            rounded = round_nearest(residual)
            err = torch.linalg.vector_norm(residual.sub_(dequantize_codes(*rounded))).item()
            if best_err is None or err < best_err:
                best_err, best = err, (up, down, rounded)
            if it < lowrank_iters:
                # Ŵ − Q(Ŵ − L) = (Ŵ − L − Q(Ŵ − L)) + L: the buffer already holds the first term.
                up, down = factors(residual.addmm_(up.float(), down.float().t()))
        up, down, (codes, scales, mins) = best
        if hessian is not None:  # the branch is chosen by weight error; the codes by output error
            codes, scales, mins = round_residual(torch.addmm(w_hat, up.float(), down.float().t(), alpha=-1))
    return QuantizedWeight(
        qweight=reference.pack_int4(codes),
        wscales=scales,
        smooth=smooth,
        lora_down=down.contiguous(),
        lora_up=up.contiguous(),
        wmins=mins,
    )


def svdquant_weight(
    weight: torch.Tensor,
    rank: int,
    *,
    act_absmax: torch.Tensor | None = None,
    smoothing_alpha: float = 0.5,
    smoothing_beta: float | None = None,
    dtype: torch.dtype | None = None,
    svd_method: str = "auto",
    lowrank_iters: int = 0,
    hessian: torch.Tensor | None = None,
    weight_only: bool = False,
    hessian_rows: int | None = None,
    scale_search: bool = True,
) -> QuantizedWeight:
    """:func:`smoothing_factors` then :func:`quantize_weight`: the whole SVDQuant of one weight.

    Args:
        weight: ``[N, K]``.
        rank: low-rank branch rank.
        act_absmax: ``[K]`` calibration absmax of the layer's input, or None (λ = 1).
        smoothing_alpha, smoothing_beta: ``α`` and ``β`` of :func:`smoothing_factors`.
        dtype, svd_method, lowrank_iters, hessian, weight_only, hessian_rows, scale_search: as in
            :func:`quantize_weight`.
    """
    smooth = smoothing_factors(weight, act_absmax, smoothing_alpha, smoothing_beta)
    return quantize_weight(
        weight,
        rank,
        smooth=smooth,
        dtype=dtype,
        svd_method=svd_method,
        lowrank_iters=lowrank_iters,
        hessian=hessian,
        weight_only=weight_only,
        hessian_rows=hessian_rows,
        scale_search=scale_search,
    )


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of unpacked residual codes ``[N, K]``: symmetric (``mins`` None, int8 codes) or the
    weight-only form ``q · s + m`` (uint8 codes)."""
    if mins is None:
        return reference.dequantize_groups(codes, scales)
    return reference.dequantize_groups_affine(codes, scales, mins)


def dequantize_weight(q: QuantizedWeight) -> torch.Tensor:
    """The float32 weight ``[N, K]`` that a :class:`QuantizedWeight` represents in the original
    (unsmoothed) input space: ``(Q⁻¹(qweight) + lora_up @ lora_down.T) / λ``."""
    unpack = reference.unpack_int4 if q.wmins is None else reference.unpack_uint4
    return reference.effective_weight(dequantize_codes(unpack(q.qweight), q.wscales, q.wmins), q.smooth,
                                      q.lora_down, q.lora_up)  # fmt: skip


# The (α, 1 − α) family on a step of 0.1, as SmoothQuant / DeepCompressor search it, plus
# (0, 0): no smoothing, so a layer whose outliers the low-rank branch already absorbs keeps λ = 1.
DEFAULT_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
# Candidates evaluated at once are bounded by memory, not count: each holds a few float32 copies
# of the weight ([N, K]) and of the samples ([S, K]).
_SEARCH_CHUNK_BYTES = 1 << 30


def smoothing_candidates(
    alphas: tuple[float, ...] = DEFAULT_ALPHA_GRID, betas: tuple[float, ...] | None = None
) -> torch.Tensor:
    """The ``(α, β)`` pairs a smoothing search scores.

    Args:
        alphas: the grid of ``α`` (each in ``[0, 1]``).
        betas: None for the ``(α, 1 − α)`` family; otherwise the full grid ``alphas × betas``.

    Returns:
        float64 ``[C, 2]``: ``(0, 0)`` (no smoothing) first, then the grid, without duplicates.
    """
    pairs = [(a, 1.0 - a) for a in alphas] if betas is None else [(a, b) for a in alphas for b in betas]
    out = [(0.0, 0.0)]
    for a, b in pairs:
        if not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0):
            raise ValueError(f"smoothing grid values must be in [0, 1], got alpha={a}, beta={b}")
        pair = (round(float(a), 6), round(float(b), 6))
        if pair not in out:
            out.append(pair)
    return torch.tensor(out, dtype=torch.float64)


class SmoothingSearch(NamedTuple):
    """The outcome of :func:`search_smoothing` for one layer.

    Attributes:
        alpha, beta: the best ``(α, β)``.
        error: its relative output error ``‖y_q − y‖² / ‖y‖²`` on the samples.
        candidates: float64 ``[C, 2]`` every ``(α, β)`` scored, ``(0, 0)`` first.
        errors: float64 ``[C]`` their relative errors.
    """

    alpha: float
    beta: float
    error: float
    candidates: torch.Tensor
    errors: torch.Tensor


def quantized_output_error(
    weight: torch.Tensor,
    smooth: torch.Tensor,
    x: torch.Tensor,
    rank: int,
    *,
    dtype: torch.dtype,
    svd_method: str = "auto",
    group_size: int = reference.GROUP_SIZE,
    scale_search: bool = False,
) -> torch.Tensor:
    """Relative output error of SVDQuant W4A4 for a batch of smoothing vectors, vectorized.

    For each ``λ_c``: the weight is smoothed, its rank-``r`` branch and INT4 residual formed as
    :func:`quantize_weight` does, the inputs fake-quantized as :func:`reference.quantize_act` does,
    and ``‖y_q − y‖² / ‖y‖²`` taken against the 16-bit layer ``y = x @ W.T`` (bias cancels).

    Args:
        weight: ``[N, K]`` float.
        smooth: ``[C, K]`` candidate λ (rounded to ``dtype`` here, as the checkpoint stores it).
        x: ``[S, K]`` input rows.
        rank: low-rank branch rank.
        dtype: model dtype of the scales and low-rank factors.
        svd_method: see :func:`low_rank`.
        scale_search: round the residual as :func:`quantize_weight` with ``scale_search`` does (without
            ``hessian``). Off by default: on real MiniLM the (α, β) it picks scored the same held-out cosine
            (0.9756 with it, 0.9757 without) at twice the search's cost (FLUX-shaped: 5.9 s vs 3.2 s per layer).

    Returns:
        float64 ``[C]``.
    """
    w = weight.float()
    xf = x.float().to(w.device)
    lam = smooth.to(dtype).float().to(w.device)
    y = xf @ w.t()
    w_hat = w.unsqueeze(0) * lam.unsqueeze(1)  # [C, N, K]
    up, down = low_rank(w_hat, rank, svd_method)
    up, down = up.to(dtype).float(), down.to(dtype).float()
    residual = w_hat.baddbmm_(up, down.mT, alpha=-1)
    if scale_search:  # the residual's codes as quantize_weight picks them (weight error: no XᵀX here)
        c, n, k = residual.shape
        codes, scales = search_group_scales(residual.reshape(c * n, k), group_size, dtype)
        r_q = reference.dequantize_groups(codes, scales).reshape(c, n, k)
    else:  # fake-quantized in place: w_hat's buffer becomes Q(R)
        r_q = reference.fake_quantize_groups(residual, group_size, dtype, inplace=True)
    x_hat = xf.unsqueeze(0) / lam.unsqueeze(1)  # [C, S, K]
    x_q = reference.fake_quantize_groups(x_hat, group_size, torch.float32)
    y_q = torch.bmm(x_q, r_q.mT).baddbmm_(torch.bmm(x_hat, down), up.mT)
    num = (y_q - y).double().pow(2).sum(dim=(1, 2))
    return num / y.double().pow(2).sum().clamp_min(1e-30)


def search_smoothing(
    weight: torch.Tensor,
    act_absmax: torch.Tensor,
    x: torch.Tensor,
    rank: int,
    *,
    dtype: torch.dtype | None = None,
    candidates: torch.Tensor | None = None,
    svd_method: str = "auto",
    chunk_bytes: int = _SEARCH_CHUNK_BYTES,
) -> SmoothingSearch:
    """Pick the layer's ``(α, β)`` by the output error after SVDQuant (docs/design.md §1, step 1).

    Every candidate is scored by :func:`quantized_output_error` on the calibration rows ``x``;
    candidates are evaluated in batches as large as ``chunk_bytes`` allows. Ties go to the earlier
    candidate, so ``(0, 0)`` (no smoothing) wins when smoothing does not help.

    Args:
        weight: ``[N, K]`` the 16-bit layer weight.
        act_absmax: ``[K]`` per-input-channel absmax over all calibration tokens.
        x: ``[S, K]`` sampled input rows (``S >= 1``).
        rank: low-rank branch rank used at quantization.
        dtype: model dtype (default ``weight.dtype``).
        candidates: float ``[C, 2]`` (from :func:`smoothing_candidates`, the default).
        svd_method: see :func:`low_rank`.
        chunk_bytes: memory bound of one batch of candidates.

    Returns:
        :class:`SmoothingSearch`.
    """
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k or x.shape[0] == 0:
        raise ValueError(f"search_smoothing: samples have shape {tuple(x.shape)}, expected [S >= 1, {k}]")
    dtype = dtype or weight.dtype
    candidates = smoothing_candidates() if candidates is None else candidates.to(torch.float64)
    lams = torch.stack([smoothing_factors(weight, act_absmax, float(a), float(b)) for a, b in candidates.tolist()])
    per_candidate = 4 * (3 * n * k + 3 * x.shape[0] * k + 2 * x.shape[0] * n)
    chunk = max(1, chunk_bytes // per_candidate)
    errors = torch.cat(
        [
            quantized_output_error(weight, lams[i : i + chunk], x, rank, dtype=dtype, svd_method=svd_method).cpu()
            for i in range(0, len(lams), chunk)
        ]
    )
    best = int(torch.argmin(errors))  # first minimum: earlier candidates win ties
    a, b = candidates[best].tolist()
    return SmoothingSearch(a, b, float(errors[best]), candidates, errors)
