"""The per-layer smoothing search over the calibration samples, split between processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import algorithm, reference
from ..config import DEFAULT_LOWRANK_ITERS, DEFAULT_RANK
from ..progress import progress_bar
from .processes import Processes
from .stats import CalibrationStats


def search_smoothing(
    model: nn.Module,
    stats: CalibrationStats,
    config: Any | None = None,
    *,
    procs: Processes | None = None,
    progress: bool = True,
    score: str = "plain",
) -> CalibrationStats:
    """Fill ``stats.smoothing`` / ``stats.search_errors`` by :func:`algorithm.search_smoothing` per layer.

    Layers with samples whose K is a multiple of 64 and ``rank <= min(N, K)`` are searched, except those
    ``config`` makes weight-only (the search scores W4A4 error; they take α = 0.5); under
    several processes the layers are dealt round-robin by size between ranks and the results
    gathered, so every rank returns the same statistics.

    Args:
        model: the 16-bit module the statistics were collected on (its weights are scored).
        stats: from the collection step, with ``samples``.
        config: ``rank`` and ``svd_method`` to score with (default
            :data:`~diffusers_svdquant.config.DEFAULT_RANK`, ``"auto"``); with ``score="held-out"`` also its
            ``lowrank_iters``, ``scale_search`` and ``gptq``.
        score: ``"plain"``: :func:`algorithm.search_smoothing` (plain SVD and rounding, on every sample);
            ``"held-out"``: :func:`heldout_search` (the final quantization, scored on rows it was not fitted on).

    Returns:
        ``stats``, updated in place.
    """
    if score not in ("plain", "held-out"):
        raise ValueError(f"search_smoothing: score must be 'plain' or 'held-out', got {score!r}")
    procs = procs or Processes()
    rank = getattr(config, "rank", DEFAULT_RANK)
    svd_method = getattr(config, "svd_method", "auto")
    todo = []
    weight_only = getattr(config, "is_weight_only", lambda name: False)
    for name, rows in stats.samples.items():
        if weight_only(name):
            continue
        weight = model.get_submodule(name).weight
        n, k = weight.shape
        if k % reference.GROUP_SIZE == 0 and rank <= min(n, k) and rows.shape[0] > 0:
            todo.append((n * k, name))
    # Largest first, dealt round-robin: the ranks' shares of work stay within one layer of each other.
    todo = [name for _, name in sorted(todo, key=lambda t: (-t[0], t[1]))][procs.rank :: procs.world]
    found: dict[str, tuple[float, float, torch.Tensor]] = {}
    for name in progress_bar(todo, desc="smoothing search", enabled=progress and procs.rank == 0):
        weight = model.get_submodule(name).weight.detach()
        if score == "held-out":
            result = heldout_search(weight, stats, name, config)
        else:
            result = algorithm.search_smoothing(
                weight, stats.act_absmax[name], stats.samples[name], rank, dtype=weight.dtype, svd_method=svd_method
            )
        found[name] = (result.alpha, result.beta, torch.stack((torch.tensor(result.error), result.errors[0])))
    for part in procs.gather(found):
        for name, (a, b, errs) in part.items():
            stats.smoothing[name] = (a, b)
            stats.search_errors[name] = errs.double()
    stats.info |= {"search_rank": rank, "svd_method": svd_method}
    return stats


def heldout_search(
    weight: torch.Tensor, stats: CalibrationStats, name: str, config: Any | None = None
) -> algorithm.SmoothingSearch:
    """Pick layer ``name``'s ``(α, β)`` among :func:`algorithm.smoothing_candidates` by the output error of the
    final quantization on sampled rows it was not fitted on.

    The samples ``[S, K]`` are split in two halves (they are in random key order): each candidate is quantized
    by :func:`algorithm.quantize_weight` with ``config``'s ``lowrank_iters`` and ``scale_search`` and, when the
    statistics carry ``XᵀX`` and ``config.gptq`` is not False, GPTQ against ``XᵀX − X_hᵀX_h`` (every
    calibration row but the held-out half ``X_h``; ``XᵀX`` as it is when it summed a share of the rows); it is
    scored on ``X_h`` through the run-time linear (:func:`reference.svdquant_linear`: activations quantized
    too), ``‖y_q − y‖² / ‖y‖²``. The absmax that λ is built from still covers every row. Ties keep the earlier
    candidate (``(0, 0)`` first).

    Not the default: on real MiniLM (every linear W4A4 r32, + GPTQ) it scored 0.9768 mean cosine on the held-out
    test sentences against the plain search's 0.9781 (α = 0.5: 0.9761), at 7x its search time (benchmarks/RESULTS.md).

    Returns:
        :class:`algorithm.SmoothingSearch` with the held-out errors.
    """
    rank = getattr(config, "rank", DEFAULT_RANK)
    samples = stats.samples[name].float()
    held = samples[samples.shape[0] // 2 :] if samples.shape[0] > 1 else samples
    hessian = stats.hessian_for(name) if getattr(config, "gptq", None) is not False else None
    rows = None
    if hessian is not None:
        rows = stats.xtx_rows(name) or 0
        if rows == stats.num_tokens.get(name, 0):  # every row was summed, the held-out half among them
            hessian = hessian.float() - held.t() @ held
            rows -= held.shape[0]
        # else XᵀX summed a share of the calls (hessian_prompts / hessian_rows_per_column) that the samples were
        # not drawn from alone: it is taken as it is, a few held-out rows perhaps in it
        rows = max(1, rows)
    y = held @ weight.float().t()
    candidates = algorithm.smoothing_candidates()
    errors = []
    for a, b in candidates.tolist():
        q = algorithm.svdquant_weight(
            weight,
            rank,
            act_absmax=stats.act_absmax[name],
            smoothing_alpha=a,
            smoothing_beta=b,
            svd_method=getattr(config, "svd_method", "auto"),
            lowrank_iters=getattr(config, "lowrank_iters", DEFAULT_LOWRANK_ITERS),
            hessian=hessian,
            hessian_rows=rows,
            scale_search=getattr(config, "scale_search", True),
        )
        y_q = reference.svdquant_linear(
            held.to(weight.dtype), q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, None
        ).float()
        errors.append(((y_q - y).double().pow(2).sum() / y.double().pow(2).sum().clamp_min(1e-30)).item())
    errs = torch.tensor(errors, dtype=torch.float64)
    best = int(torch.argmin(errs))
    a, b = candidates[best].tolist()
    return algorithm.SmoothingSearch(a, b, float(errs[best]), candidates, errs)
