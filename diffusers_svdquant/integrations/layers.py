"""Layer selection and swapping shared by the diffusers and transformers quantizers.

Both loaders pick their layers with :func:`~diffusers_svdquant.config.quantizable_linears`, put
meta :class:`SVDQuantLinear` skeletons in their place (:func:`replace_with_skeletons`), quantize
each 16-bit weight as it arrives (:func:`quantize_layer_weight`) or check that a pre-quantized
checkpoint holds every canonical tensor (:func:`check_checkpoint_tensors`). :func:`quantize_` and
:func:`dequantize_` do the same on a model already in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import algorithm
from ..calibration import CalibrationStats, load_calibration
from ..config import (
    DEFAULT_MODULES_TO_NOT_CONVERT,
    SVDQuantConfig,
    component_patterns,
    pattern_matches,
    quantizable_linears,
)
from ..linear import SVDQuantLinear, W4A16Linear, canonical_shapes
from ..progress import progress_bar
from ..reference import GROUP_SIZE


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def check_device_map(device_map: Any) -> None:
    """Refuse a ``device_map`` that offloads to disk (quantized layers cannot be memory-mapped back)."""
    if isinstance(device_map, dict) and "disk" in device_map.values():
        raise ValueError("svdquant: offloading quantized layers to disk is not supported")


def warn_unmatched_patterns(model: nn.Module, config: SVDQuantConfig) -> None:
    """Warn, by name, about each of the user's ``modules_to_not_convert`` patterns that matches no module
    of ``model`` (a typo keeps nothing 16-bit). The built-in defaults cover many model families, so
    they are not expected to match everywhere."""
    names = [n for n, _ in model.named_modules() if n]
    for p in config.modules_to_not_convert:
        if p not in DEFAULT_MODULES_TO_NOT_CONVERT and not any(
            pattern_matches(n, p, config.format_version) for n in names
        ):
            warnings.warn(
                f"svdquant: modules_to_not_convert pattern {p!r} matches no module of {type(model).__name__}; "
                f"it keeps nothing 16-bit",
                UserWarning,
                stacklevel=3,
            )


def load_targets(
    model: nn.Module,
    config: SVDQuantConfig,
    keep_in_fp32: Iterable[str],
    warn_unmatched: bool = True,
    keep_top_level_only: bool = False,
) -> dict[str, nn.Linear]:
    """The layers a loader quantizes: :func:`quantizable_linears` with the model's ``_keep_in_fp32_modules``
    (module-name components, as diffusers and transformers read them) kept 16-bit too.

    ``keep_top_level_only``: match those names only at the top level, as the diffusers loader did for
    checkpoints of ``format_version`` 1, so they reload with the layers they were saved with.

    Raises:
        ValueError: no layer of ``model`` is quantizable (names the model class).
    """
    if warn_unmatched:
        warn_unmatched_patterns(model, config)
    keep = list(keep_in_fp32)
    extra = [f"^{n}" for n in keep] if keep_top_level_only else component_patterns(keep)
    not_convert = list(config.modules_to_not_convert) + extra
    rule = SVDQuantConfig(**{**config.to_dict(), "modules_to_not_convert": not_convert})
    targets = quantizable_linears(model, rule)
    if not targets:
        raise ValueError(
            f"svdquant: no linear layer of {type(model).__name__} is quantizable (all excluded or in_features "
            f"not a multiple of {GROUP_SIZE})"
        )
    return targets


def layer_class(config: SVDQuantConfig, name: str) -> type[SVDQuantLinear]:
    """The kind of quantized layer ``config`` makes of the target ``name``: W4A4 or weight-only."""
    return W4A16Linear if config.is_weight_only(name) else SVDQuantLinear


def replace_with_skeletons(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    config: SVDQuantConfig,
    dtype: Callable[[nn.Linear], torch.dtype],
    placeholder: Callable[[nn.Linear], nn.Parameter] | None,
    ranks: dict[str, int] | None = None,
) -> dict[str, SVDQuantLinear]:
    """Swap each target for a meta :class:`SVDQuantLinear` (or :class:`W4A16Linear`, by
    :func:`layer_class`) of the same shape that loading fills in.

    Args:
        targets: from :func:`load_targets`.
        config: gives each layer's kind (:func:`layer_class`) and the low-rank branch's rank.
        dtype: the skeleton's float dtype for each linear.
        placeholder: when given, a meta ``weight`` ``[N, K]`` for the skeleton to expose (the loaders
            only route checkpoint names the model has, so quantize-on-load needs one to receive the
            16-bit weight).
        ranks: each layer's rank as a pre-quantized checkpoint holds it (:func:`check_checkpoint_tensors`);
            None: ``config.rank`` everywhere.

    Returns:
        The skeletons, by name.
    """
    skeletons = {}
    for name, linear in targets.items():
        r = config.rank if ranks is None else ranks[name]
        k, n, bias = linear.in_features, linear.out_features, linear.bias is not None
        layer = layer_class(config, name)(k, n, r, bias, dtype(linear), "meta")
        if placeholder is not None:
            layer.weight = placeholder(linear)
        replace_module(model, name, layer)
        skeletons[name] = layer
    return skeletons


def quantize_(model: nn.Module, config: SVDQuantConfig) -> nn.Module:
    """Quantize an already-loaded model in place (any ``nn.Module``, e.g. a transformers encoder).

    The layers :func:`quantizable_linears` selects become :class:`SVDQuantLinear` (or
    :class:`W4A16Linear` where ``config.weight_only_modules`` says so), using
    ``config.calibration`` for smoothing when given. ``from_pretrained(..., quantization_config=...)``
    is the memory-frugal route for diffusers models; this one needs the 16-bit model in memory.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` already holds SVDQuant layers of another rank or config (quantizing twice
            would mix two settings in one model without a word).
    """
    _refuse_requantization(model, config)
    warn_unmatched_patterns(model, config)
    targets = quantizable_linears(model, config)
    stats = calibration_for(config, model, targets)
    for name, linear in targets.items():
        cls = layer_class(config, name)
        absmax, alpha, beta = stats.smoothing_for(name, config.smoothing_alpha, cls.WEIGHT_ONLY)
        try:
            layer = cls.from_linear(
                linear,
                config.rank,
                act_absmax=absmax,
                smoothing_alpha=alpha,
                smoothing_beta=beta,
                svd_method=config.svd_method,
                lowrank_iters=config.lowrank_iters,
                hessian=gptq_hessian(config, stats, name, cls.WEIGHT_ONLY),
                hessian_rows=stats.xtx_rows(name),
                scale_search=config.scale_search,
            )
        except ValueError as e:
            raise ValueError(f"svdquant: cannot quantize layer {name!r}: {e}") from e
        replace_module(model, name, layer)
    return model


def _refuse_requantization(model: nn.Module, config: SVDQuantConfig) -> None:
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}
    if not quantized:
        return
    recorded = getattr(getattr(model, "config", None), "quantization_config", None)
    recorded = recorded.to_dict() if isinstance(recorded, SVDQuantConfig) else recorded
    ignore = ("torch_dtype", "format_version")
    same = {k: v for k, v in config.to_dict().items() if k not in ignore}
    ranks = sorted({m.rank for m in quantized.values()})
    if ranks != [config.rank] or (
        isinstance(recorded, dict) and {k: v for k, v in recorded.items() if k not in ignore} != same
    ):
        raise ValueError(
            f"svdquant: {type(model).__name__} is already quantized ({len(quantized)} SVDQuantLinear layers, "
            f"rank {', '.join(map(str, ranks))}); quantize_ with another config would mix two settings. Load the "
            f"16-bit model again, or dequantize_ it first"
        )


def calibration_for(config: SVDQuantConfig, model: nn.Module, targets: dict[str, nn.Linear]) -> CalibrationStats:
    """The statistics ``config.calibration`` names, checked against the layers they will smooth.

    Raises:
        ValueError: statistics that match none of ``targets`` (made from another model), or a layer whose
            statistics have another width than its ``in_features``.

    Warns:
        UserWarning: statistics that cover only some of ``targets`` (the rest get λ = 1), with the counts.
    """
    stats = load_calibration(config.calibration)
    if not stats.act_absmax:
        return stats
    made_from = stats.info.get("model_class")
    source = f" (they were made from {made_from})" if made_from else ""
    if made_from and made_from != type(model).__name__:
        raise ValueError(
            f"svdquant: the calibration statistics were made from {made_from}, not {type(model).__name__}: "
            f"they belong to another model"
        )
    matched = [n for n in targets if n in stats.act_absmax]
    if not matched:
        raise ValueError(
            f"svdquant: the calibration statistics cover none of the {len(targets)} quantized layers of "
            f"{type(model).__name__}{source}: they belong to another model"
        )
    for name in matched:
        got, k = tuple(stats.act_absmax[name].shape), targets[name].in_features
        if got != (k,):
            raise ValueError(
                f"svdquant: calibration statistics for layer {name!r} have shape {list(got)}, but the layer takes "
                f"{k} input features: they belong to another model{source}"
            )
    if len(matched) < len(targets):
        missing = [n for n in targets if n not in stats.act_absmax]
        warnings.warn(
            f"svdquant: the calibration statistics cover {len(matched)} of the {len(targets)} quantized layers of "
            f"{type(model).__name__}{source}; the other {len(missing)} (e.g. {missing[0]!r}) are not smoothed",
            UserWarning,
            stacklevel=3,
        )
    return stats


def gptq_hessian(
    config: SVDQuantConfig, stats: CalibrationStats, name: str, weight_only: bool = False
) -> torch.Tensor | None:
    """Layer ``name``'s ``XᵀX`` when ``config.gptq`` asks for GPTQ and the statistics carry it, else None
    (round to nearest). With ``gptq=True`` a layer without it is warned about by name.

    A ``weight_only`` layer takes GPTQ only with ``gptq=True``: against its least-squares refitted
    rounding (:func:`~diffusers_svdquant.algorithm.affine_groups`) GPTQ measured no gain on held-out data
    (real MiniLM, every linear W4A16: 0.987 mean cosine either way; synthetic layers: 0.97-1.04x the
    refit's held-out error), so ``gptq=None`` leaves it to the refit."""
    if config.gptq is False or (weight_only and config.gptq is None):
        return None
    hessian = stats.hessian_for(name)
    if hessian is None and config.gptq:
        warnings.warn(
            f"svdquant: gptq=True but the calibration statistics carry no XᵀX for layer {name!r} (gather it with "
            f"calibrate(..., hessian=True)); its residual is rounded to nearest",
            UserWarning,
            stacklevel=3,
        )
    return hessian


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
    act_absmax, alpha, beta = stats.smoothing_for(module_name, config.smoothing_alpha, layer.WEIGHT_ONLY)
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
            hessian=gptq_hessian(config, stats, module_name, layer.WEIGHT_ONLY),
            hessian_rows=stats.xtx_rows(module_name),
            scale_search=config.scale_search,
            weight_only=layer.WEIGHT_ONLY,
        )
    except ValueError as e:
        raise ValueError(f"svdquant: cannot quantize layer {module_name!r}: {e}") from e


class QuantizerTraits:
    """What the diffusers and the transformers quantizer answer alike: an SVDQuant model compiles and
    trains adapters (QLoRA). Listed first among a quantizer's bases."""

    @property
    def is_trainable(self) -> bool:
        """True: gradients flow through the frozen 4-bit layers to their input, so LoRA adapters train on top."""
        return True

    @property
    def is_compileable(self) -> bool:
        """True: every op has a fake implementation, so torch.compile traces through the layers."""
        return True


class OnLoadQuantizer:
    """What a loader holds while it quantizes a model on load: the checked calibration statistics
    (:func:`calibration_for`) and a progress bar over the layers. Dropped when loading ends, so the
    model (which keeps its quantizer) does not pin the statistics."""

    def __init__(self, config: SVDQuantConfig, model: nn.Module, targets: dict[str, nn.Linear]) -> None:
        self.config = config
        self.stats = calibration_for(config, model, targets)
        self.bar = progress_bar(desc=f"svdquant: quantizing {type(model).__name__}", total=len(targets))

    def quantize(self, module_name: str, layer: SVDQuantLinear, weight: torch.Tensor) -> algorithm.QuantizedWeight:
        """:func:`quantize_layer_weight` for one arriving 16-bit weight ``[N, K]``, counted on the bar."""
        q = quantize_layer_weight(module_name, layer, weight, self.config, self.stats)
        self.bar.update()
        return q

    @staticmethod
    def finish(on_load: OnLoadQuantizer | None) -> None:
        """End ``on_load``'s bar, if there is one; returns None for the loader to drop it."""
        if on_load is not None:
            on_load.bar.close()


def check_checkpoint_tensors(
    targets: dict[str, nn.Linear], config: SVDQuantConfig, shape_of: Callable[[str], tuple[int, ...] | None]
) -> dict[str, int]:
    """Fail before loading when a quantized layer's canonical tensors are absent from a checkpoint, do not fit
    the layer, or are of the other kind (W4A4 / weight-only) than the config's selection rule makes of it;
    return each layer's rank, read from its tensors.

    A layer's rank is ``lora_down``'s second dimension (``[K, r]``, docs/design.md §2), not the config's ``rank``:
    a fused LoRA (``fuse_lora``) widens the branch of the layers it touches, so one checkpoint holds several ranks.
    Where only a tensor's presence is known (not safetensors), the config's ``rank`` is assumed.

    Args:
        targets: the layers the config quantizes, by name (:func:`quantizable_linears`).
        config: the checkpoint's config: each layer's kind, and the rank assumed where shapes are unknown.
        shape_of: a tensor's shape in the checkpoint, ``()`` when only its presence is known, None when absent.

    Returns:
        ``{layer name: rank}`` for every target.
    """
    ranks = {}
    for name, linear in targets.items():
        weight_only = layer_class(config, name).WEIGHT_ONLY
        if not weight_only and shape_of(f"{name}.wmins") is not None:
            raise ValueError(
                f"svdquant checkpoint: layer {name!r} holds weight-only (W4A16) tensors ({name}.wmins), but the "
                f"quantization_config's weight_only_modules make it W4A4; the config does not match the tensors"
            )
        down = shape_of(f"{name}.lora_down")
        # A 2-D lora_down [K, r] sets r; anything else is judged against the config's rank below.
        ranks[name] = down[1] if down is not None and len(down) == 2 else config.rank
        k, n, bias = linear.in_features, linear.out_features, linear.bias is not None
        wanted = canonical_shapes(k, n, ranks[name], bias, weight_only)
        missing = [t for t in wanted if shape_of(f"{name}.{t}") is None]
        if missing:
            hint = (
                " (it holds a 16-bit `weight` instead: was it saved with a different modules_to_not_convert?)"
                if shape_of(f"{name}.weight") is not None
                else ""
            )
            if missing == ["wmins"]:
                hint = " (it holds W4A4 tensors: the quantization_config's weight_only_modules do not match them)"
            raise ValueError(
                f"svdquant checkpoint is missing {', '.join(f'{name}.{t}' for t in missing)} for quantized "
                f"layer {name!r}{hint}"
            )
        for t, shape in wanted.items():
            got = shape_of(f"{name}.{t}")
            if got and tuple(got) != shape:
                raise ValueError(
                    f"svdquant checkpoint: {name}.{t} has shape {list(got)}, but layer {name!r} (weight "
                    f"[{linear.out_features}, {linear.in_features}], rank {ranks[name]} from its lora_down) needs "
                    f"{list(shape)}; the tensors do not fit the model. Loading with ignore_mismatched_sizes would give "
                    f"a layer of random weights"
                )
        if not ranks[name] <= min(linear.in_features, linear.out_features):
            raise ValueError(
                f"svdquant checkpoint: {name}.lora_down has rank {ranks[name]}, more than min(in, out) = "
                f"{min(linear.in_features, linear.out_features)} for layer {name!r}"
            )
    return ranks


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
