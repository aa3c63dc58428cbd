"""The block-level check: quantize one transformer block with candidate settings and compare its output with the
16-bit block on held-out inputs, so the per-layer choices are judged together.

:func:`record_block_inputs` captures what each block receives while ``run`` feeds held-out data to the 16-bit
model; :func:`block_error` scores a quantized copy of a block on them; :func:`choose_block_smoothing` keeps, per
block, the smoothing (e.g. the per-layer search's pairs, or α = 0.5 everywhere) whose quantized block is closest
to the 16-bit one, and writes it into the statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .recorder import forward_pre_hooks
from .stats import CalibrationStats

Call = tuple[tuple[Any, ...], dict[str, Any]]


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks: the children of the outermost ``nn.ModuleList`` s that hold linear
    layers (``encoder.layer.0`` … for BERT, ``transformer_blocks.0`` … and ``single_transformer_blocks.0`` … for
    FLUX; a block's own lists, such as ``attn.to_out``, are inside it)."""
    out: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(b + ".") for b in out):
            continue
        for i, child in enumerate(module):
            if not isinstance(child, nn.Linear) and any(isinstance(m, nn.Linear) for m in child.modules()):
                out.append(f"{name}.{i}" if name else str(i))
    return out


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def record_block_inputs(
    model: nn.Module, run: Callable[[nn.Module], Any], blocks: Sequence[str], max_calls: int = 8
) -> dict[str, list[Call]]:
    """The ``(args, kwargs)`` of the first ``max_calls`` calls of each block while ``run(model)`` runs (under
    ``torch.no_grad``), tensors detached and copied; the hooks are removed however ``run`` ends."""
    calls: dict[str, list[Call]] = {name: [] for name in blocks}

    def hook(name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(calls[name]) < max_calls:
                calls[name].append((_detached(args), _detached(kwargs)))

        return record

    with forward_pre_hooks((model.get_submodule(n), hook(n)) for n in blocks):
        run(model)
    return calls


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a block's output (a FLUX double block returns both streams)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        return _tensors(out.to_tuple())
    return []


def block_error(block16: nn.Module, blockq: nn.Module, calls: Sequence[Call]) -> float:
    """Relative error ``Σ‖y_q − y‖² / Σ‖y‖²`` of ``blockq``'s output tensors against ``block16``'s, summed over
    the recorded ``calls`` and every output tensor (float64)."""
    num = den = 0.0
    with torch.no_grad():
        for args, kwargs in calls:
            for y, y_q in zip(_tensors(block16(*args, **kwargs)), _tensors(blockq(*args, **kwargs)), strict=True):
                y, y_q = y.double(), y_q.double()
                num += (y_q - y).pow(2).sum().item()
                den += y.pow(2).sum().item()
    return num / max(den, 1e-30)


def block_statistics(stats: CalibrationStats, prefix: str) -> CalibrationStats:
    """The statistics of the layers under module ``prefix``, named relative to it (their ``XᵀX`` read into
    memory: one block's)."""
    cut = len(prefix) + 1

    def mine(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k[cut:]: v for k, v in d.items() if k.startswith(prefix + ".")}

    return CalibrationStats(
        act_absmax=mine(stats.act_absmax),
        num_tokens=mine(stats.num_tokens),
        hessian_rows=mine(stats.hessian_rows),
        smoothing=mine(stats.smoothing),
        hessian={k[cut:]: stats.hessian_for(k) for k in stats.hessian_names() if k.startswith(prefix + ".")},
    )


def choose_block_smoothing(
    model: nn.Module,
    stats: CalibrationStats,
    config: Any,
    inputs: Mapping[str, Sequence[Call]],
    alternatives: Mapping[str, Mapping[str, tuple[float, float]]],
) -> dict[str, dict[str, float]]:
    """For each block of ``inputs``, quantize a copy with each alternative smoothing, keep the one whose output
    is closest to the 16-bit block's (:func:`block_error`; ties keep the earlier alternative) and write its
    pairs into ``stats.smoothing``.

    Args:
        model: the 16-bit model the statistics were made from (not modified).
        stats: its statistics (absmax, ``XᵀX`` when GPTQ is to be checked too); ``smoothing`` is updated.
        config: an :class:`~diffusers_svdquant.SVDQuantConfig` with everything but ``calibration`` as quantization
            will use it (``smoothing_alpha`` must be None: it would override every alternative).
        inputs: block name → recorded calls (:func:`record_block_inputs`, on held-out data).
        alternatives: name → ``{layer name: (α, β)}`` (full model names; a layer missing from one keeps
            ``stats.smoothing``'s pair, or ``(0.5, 0.5)``).

    Returns:
        block name → alternative name → block error.
    """
    from .. import SVDQuantConfig, quantize_

    if getattr(config, "smoothing_alpha", None) is not None:
        raise ValueError("choose_block_smoothing: config.smoothing_alpha overrides every alternative; leave it None")
    errors: dict[str, dict[str, float]] = {}
    for block, calls in inputs.items():
        block16 = model.get_submodule(block)
        sub = block_statistics(stats, block)
        searched = dict(sub.smoothing)
        errors[block] = {}
        for alt, pairs in alternatives.items():
            sub.smoothing = {n: pairs.get(f"{block}.{n}", searched.get(n, (0.5, 0.5))) for n in sub.act_absmax}
            blockq = quantize_(copy.deepcopy(block16), SVDQuantConfig(**(config.to_dict() | {"calibration": sub})))
            errors[block][alt] = block_error(block16, blockq, calls)
        order = list(alternatives)
        best = min(order, key=lambda a: (errors[block][a], order.index(a)))
        for name, pair in alternatives[best].items():
            if name.startswith(block + "."):
                stats.smoothing[name] = pair
    return errors
