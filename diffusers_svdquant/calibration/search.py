"""The per-layer smoothing search over the calibration samples, split between processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import algorithm, reference
from ..config import DEFAULT_RANK
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
            :data:`~diffusers_svdquant.config.DEFAULT_RANK`, ``"auto"``).

    Returns:
        ``stats``, updated in place.
    """
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
