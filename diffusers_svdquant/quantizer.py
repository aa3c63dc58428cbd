"""The diffusers quantizer for ``quant_method: "svdquant"`` and its registration.

diffusers has no public registration call: ``diffusers.quantizers.auto`` resolves
``quant_method`` through two module-level dicts read at call time, so :func:`register` adds
``"svdquant"`` to both (and to transformers' registry, see :mod:`diffusers_svdquant.transformers_quantizer`).

Two loading flows share one skeleton (DESIGN.md §5):

* quantize on load — the checkpoint holds 16-bit ``weight``\\ s; each target ``nn.Linear`` becomes an
  :class:`SVDQuantLinear` that still exposes a meta ``weight``, and :meth:`create_quantized_param`
  quantizes each weight the moment it is read, so at most one 16-bit layer is alive at a time;
* pre-quantized — ``config.json`` carries ``quantization_config``; the skeleton exposes the canonical
  tensors and the loader fills them by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from . import algorithm, reference
from .calibration import CalibrationStats, load_calibration
from .config import SVDQuantConfig
from .linear import QUANT_TENSORS, SVDQuantLinear

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

logger = logging.getLogger(__name__)


def _dtype_from_str(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"SVDQuantConfig: unknown torch_dtype {name!r}")
    return dtype


def quantizable_linears(model: nn.Module, config: SVDQuantConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``config`` quantizes, by name.

    A linear stays in 16-bit when a :attr:`SVDQuantConfig.modules_to_not_convert` pattern matches
    it or when its ``in_features`` is not a multiple of 64 (documented fallback). The same rule
    decides both at quantization and at reload, so the checkpoint needs no per-layer list.

    Raises:
        ValueError: a target layer is smaller than the rank (names the layer and its shape).
    """
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or config.is_excluded(name):
            continue
        if module.in_features % reference.GROUP_SIZE:
            logger.info(
                "svdquant: %s keeps 16-bit weights (in_features=%d is not a multiple of 64)", name, module.in_features
            )
            continue
        if config.rank > min(module.in_features, module.out_features):
            raise ValueError(
                f"SVDQuantConfig: rank {config.rank} is larger than min(out, in) = "
                f"{min(module.in_features, module.out_features)} of layer {name!r} "
                f"(weight [{module.out_features}, {module.in_features}]); lower the rank or add the layer "
                f"to modules_to_not_convert"
            )
        found[name] = module
    return found


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


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
        _replace_module(model, name, layer)
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
        _replace_module(model, name, linear)
    return model


class SVDQuantDiffusersQuantizer(DiffusersQuantizer):
    """``DiffusersQuantizer`` for SVDQuant W4A4: quantize on load, or load a quantized checkpoint."""

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: SVDQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype | None = None
        self._loaded_keys: set[str] | None = None
        self._calibration = CalibrationStats()

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("svdquant: offloading quantized layers to disk is not supported")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        recorded = _dtype_from_str(self.quantization_config.torch_dtype)
        if torch_dtype is None:
            torch_dtype = recorded if (self.pre_quantized and recorded is not None) else torch.float32
        if not self.pre_quantized:
            self.quantization_config.torch_dtype = str(torch_dtype).removeprefix("torch.")
        self.torch_dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self._loaded_keys = set(loaded_keys)
        return loaded_keys

    def _process_model_before_weight_loading(
        self, model: ModelMixin, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> None:
        config = self.quantization_config
        not_convert = list(config.modules_to_not_convert) + list(keep_in_fp32_modules or [])
        self.modules_to_not_convert = not_convert
        rule = SVDQuantConfig(**{**config.to_dict(), "modules_to_not_convert": not_convert})
        targets = quantizable_linears(model, rule)
        if not targets:
            raise ValueError(
                f"svdquant: no linear layer of {type(model).__name__} is quantizable (all excluded or in_features "
                f"not a multiple of 64)"
            )
        if self.pre_quantized and self._loaded_keys is not None:
            check_checkpoint_keys(targets, self._loaded_keys.__contains__)
        else:
            self._calibration = load_calibration(config.calibration)
        dtype = self.torch_dtype or torch.float32
        for name, linear in targets.items():
            layer = SVDQuantLinear(
                linear.in_features, linear.out_features, config.rank, linear.bias is not None, dtype, "meta"
            )
            if not self.pre_quantized:
                # The loader only fills names the model exposes: keep a meta `weight` to receive the
                # 16-bit tensor that create_quantized_param turns into the canonical ones.
                layer.weight = nn.Parameter(
                    torch.empty(linear.out_features, linear.in_features, dtype=dtype, device="meta"),
                    requires_grad=False,
                )
            _replace_module(model, name, layer)
        model.config.quantization_config = config
        logger.info("svdquant: %d linear layers replaced by SVDQuantLinear", len(targets))

    def check_if_quantized_param(
        self, model: ModelMixin, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any], **kwargs: Any
    ) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if self.pre_quantized or tensor_name != "weight":
            return False
        return isinstance(model.get_submodule(module_name), SVDQuantLinear)

    def create_quantized_param(
        self,
        model: ModelMixin,
        param_value: torch.Tensor,
        param_name: str,
        target_device: torch.device | str | int,
        state_dict: dict[str, Any],
        unexpected_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        module_name = param_name.rpartition(".")[0]
        layer: SVDQuantLinear = model.get_submodule(module_name)
        device = torch.device("cpu") if target_device in (None, "cpu") else torch.device(target_device)
        q = quantize_layer_weight(
            module_name, layer, param_value.to(device), self.quantization_config, self._calibration
        )
        # The bias, if any, is loaded by name like any other tensor.
        layer.load_quantized(q, None)
        del layer.weight

    def update_missing_keys(self, model: ModelMixin, missing_keys: list[str], prefix: str) -> list[str]:
        if self.pre_quantized:
            return missing_keys
        produced = {
            f"{name}.{t}" for name, m in model.named_modules() if isinstance(m, SVDQuantLinear) for t in QUANT_TENSORS
        }
        return [k for k in missing_keys if k not in produced]

    def _process_model_after_weight_loading(self, model: ModelMixin, **kwargs: Any) -> ModelMixin:
        for name, module in model.named_modules():
            if not isinstance(module, SVDQuantLinear):
                continue
            if "weight" in module._parameters:
                raise ValueError(f"svdquant: the checkpoint has no weight for layer {name!r}; it cannot be quantized")
            for t, p in module.named_parameters(recurse=False):
                if p.device.type == "meta":
                    raise ValueError(f"svdquant: {name}.{t} was not loaded from the checkpoint")
        return model

    def _dequantize(self, model: ModelMixin) -> ModelMixin:
        return dequantize_(model)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method: "svdquant"`` resolve in diffusers (and transformers, when importable).

    Idempotent. Raises ``RuntimeError`` if another package already holds the key with a different
    class: overwriting it silently would load the wrong model.
    """
    from diffusers.quantizers import auto

    for mapping, cls in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, SVDQuantConfig),
        (auto.AUTO_QUANTIZER_MAPPING, SVDQuantDiffusersQuantizer),
    ):
        held = mapping.get("svdquant")
        if held is not None and held is not cls:
            raise RuntimeError(
                f"diffusers already maps quant_method 'svdquant' to {held.__module__}.{held.__qualname__}; "
                f"refusing to replace it with {cls.__module__}.{cls.__qualname__}"
            )
        mapping["svdquant"] = cls

    from .transformers_quantizer import register_transformers  # here: that module imports this one

    register_transformers()
