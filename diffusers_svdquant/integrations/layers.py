"""Layer selection and swapping shared by the diffusers and transformers quantizers.

Both loaders pick their layers with :func:`~diffusers_svdquant.config.quantizable_linears`, put
meta :class:`SVDQuantLinear` skeletons in their place (:func:`replace_with_skeletons`), quantize
each 16-bit weight as it arrives (:func:`quantize_layer_weight`) or check that a pre-quantized
checkpoint holds every canonical tensor (:func:`check_checkpoint_keys`). :func:`quantize_` and
:func:`dequantize_` do the same on a model already in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import algorithm
from ..calibration import CalibrationStats, load_calibration
from ..config import SVDQuantConfig, quantizable_linears
from ..linear import QUANT_TENSORS, SVDQuantLinear
from ..reference import GROUP_SIZE


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_device_map(device_map: Any) -> None:
    """Refuse a ``device_map`` that offloads to disk (quantized layers cannot be memory-mapped back)."""
    if isinstance(device_map, dict) and "disk" in device_map.values():
        raise ValueError("svdquant: offloading quantized layers to disk is not supported")


def load_targets(model: nn.Module, config: SVDQuantConfig, extra_not_convert: Iterable[str]) -> dict[str, nn.Linear]:
    """The layers a loader quantizes: :func:`quantizable_linears` with the loader's own 16-bit patterns
    (``_keep_in_fp32_modules``) added to the config's.

    Raises:
        ValueError: no layer of ``model`` is quantizable (names the model class).
    """
    not_convert = list(config.modules_to_not_convert) + list(extra_not_convert)
    rule = SVDQuantConfig(**{**config.to_dict(), "modules_to_not_convert": not_convert})
    targets = quantizable_linears(model, rule)
    if not targets:
        raise ValueError(
            f"svdquant: no linear layer of {type(model).__name__} is quantizable (all excluded or in_features "
            f"not a multiple of {GROUP_SIZE})"
        )
    return targets


def replace_with_skeletons(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    rank: int,
    dtype: Callable[[nn.Linear], torch.dtype],
    placeholder: Callable[[nn.Linear], nn.Parameter] | None,
) -> dict[str, SVDQuantLinear]:
    """Swap each target for a meta :class:`SVDQuantLinear` of the same shape that loading fills in.

    Args:
        targets: from :func:`load_targets`.
        rank: the low-rank branch's rank.
        dtype: the skeleton's float dtype for each linear.
        placeholder: when given, a meta ``weight`` ``[N, K]`` for the skeleton to expose (the loaders
            only route checkpoint names the model has, so quantize-on-load needs one to receive the
            16-bit weight).

    Returns:
        The skeletons, by name.
    """
    skeletons = {}
    for name, linear in targets.items():
        layer = SVDQuantLinear(
            linear.in_features, linear.out_features, rank, linear.bias is not None, dtype(linear), "meta"
        )
        if placeholder is not None:
            layer.weight = placeholder(linear)
        replace_module(model, name, layer)
        skeletons[name] = layer
    return skeletons


def quantize_(model: nn.Module, config: SVDQuantConfig) -> nn.Module:
    """Quantize an already-loaded model in place (any ``nn.Module``, e.g. a transformers encoder).

    The layers :func:`quantizable_linears` selects become :class:`SVDQuantLinear`, using
    ``config.calibration`` for smoothing when given. ``from_pretrained(..., quantization_config=...)``
    is the memory-frugal route for diffusers models; this one needs the 16-bit model in memory.

    Returns:
        ``model``.
    """
    stats = load_calibration(config.calibration)
    for name, linear in quantizable_linears(model, config).items():
        absmax, alpha, beta = stats.smoothing_for(name, config.smoothing_alpha)
        try:
            layer = SVDQuantLinear.from_linear(
                linear,
                config.rank,
                act_absmax=absmax,
                smoothing_alpha=alpha,
                smoothing_beta=beta,
                svd_method=config.svd_method,
                lowrank_iters=config.lowrank_iters,
            )
        except ValueError as e:
            raise ValueError(f"svdquant: cannot quantize layer {name!r}: {e}") from e
        replace_module(model, name, layer)
    return model


def quantize_layer_weight(
    module_name: str,
    layer: SVDQuantLinear,
    weight: torch.Tensor,
    config: SVDQuantConfig,
    stats: CalibrationStats,
) -> algorithm.QuantizedWeight:
    """SVDQuant one 16-bit weight ``[N, K]`` arriving for the skeleton ``layer`` while loading.

    ``stats`` gives the layer's activation absmax and searched ``(α, β)``
    (:meth:`CalibrationStats.smoothing_for`). Returns the canonical tensors in ``layer``'s dtype on
    ``weight``'s device; ``ValueError`` naming the layer for a wrong shape or a weight the
    algorithm rejects.
    """
    act_absmax, alpha, beta = stats.smoothing_for(module_name, config.smoothing_alpha)
    expected = (layer.out_features, layer.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"svdquant: {module_name}.weight has shape {tuple(weight.shape)}, expected {list(expected)}")
    try:
        return algorithm.svdquant_weight(
            weight,
            config.rank,
            act_absmax=act_absmax,
            smoothing_alpha=alpha,
            smoothing_beta=beta,
            dtype=layer.wscales.dtype,
            svd_method=config.svd_method,
            lowrank_iters=config.lowrank_iters,
        )
    except ValueError as e:
        raise ValueError(f"svdquant: cannot quantize layer {module_name!r}: {e}") from e


def check_checkpoint_keys(targets: dict[str, nn.Linear], present: Callable[[str], bool]) -> None:
    """Fail before loading when a quantized layer's tensors are absent from a checkpoint.

    Args:
        targets: the layers the config quantizes, by name (:func:`quantizable_linears`).
        present: whether a tensor name is in the checkpoint.
    """
    for name, linear in targets.items():
        wanted = QUANT_TENSORS + (("bias",) if linear.bias is not None else ())
        missing = [t for t in wanted if not present(f"{name}.{t}")]
        if not missing:
            continue
        hint = (
            " (it holds a 16-bit `weight` instead: was it saved with a different modules_to_not_convert?)"
            if present(f"{name}.weight")
            else ""
        )
        raise ValueError(
            f"svdquant checkpoint is missing {', '.join(f'{name}.{t}' for t in missing)} for quantized "
            f"layer {name!r}{hint}"
        )


def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every :class:`SVDQuantLinear` back for an ``nn.Linear`` holding the weight it computes with.

    Args:
        model: a quantized model, changed in place.
        dtype: dtype of the new linears (default: each layer's model dtype).

    Returns:
        ``model``.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, SVDQuantLinear):
            continue
        w = module.dequantized_weight()
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                           device=w.device, dtype=dtype or module.wscales.dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(w)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        replace_module(model, name, linear)
    return model
