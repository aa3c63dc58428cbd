"""Activation statistics for smoothing: per-input-channel absmax of every ``nn.Linear`` input.

SVDQuant's smoothing ``λ_j = max|X_j|^α / max|W_j|^(1-α)`` needs ``max|X_j|`` per layer; forward
pre-hooks record it while the 16-bit model runs on representative inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class CalibrationStats:
    """Per-layer activation statistics.

    Attributes:
        act_absmax: module name → float32 ``[K]``, the absmax of each input channel over every
            token the layer saw.
        num_tokens: module name → number of input rows seen.
    """

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: dict[str, int] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``act_absmax`` to a safetensors file (what ``SVDQuantConfig(calibration=path)`` reads)."""
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in self.act_absmax.items()},
            os.fspath(path),
            metadata={"format": "svdquant-calibration", "num_tokens": repr(self.num_tokens)},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            absmax = {k: f.get_tensor(k) for k in f.keys()}
        import ast

        return cls(absmax, ast.literal_eval(meta.get("num_tokens", "{}")))


def calibrate(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    module_filter: Callable[[str, nn.Linear], bool] | None = None,
) -> CalibrationStats:
    """Run ``run(model)`` with hooks on every ``nn.Linear`` and return the input absmax per channel.

    Args:
        model: any module; names in the result are ``model.named_modules()`` names.
        run: called once with ``model``; it runs the forward passes (under ``torch.no_grad``).
        module_filter: ``(name, linear) -> bool`` to restrict which layers are recorded.

    Returns:
        :class:`CalibrationStats` with float32 ``[K]`` tensors on the CPU.
    """
    stats = CalibrationStats()
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["input"]).detach()
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] == 0:
                return
            m = x2.abs().amax(dim=0).float().cpu()
            prev = stats.act_absmax.get(name)
            stats.act_absmax[name] = m if prev is None else torch.maximum(prev, m)
            stats.num_tokens[name] = stats.num_tokens.get(name, 0) + x2.shape[0]

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (module_filter is None or module_filter(name, module)):
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return stats
