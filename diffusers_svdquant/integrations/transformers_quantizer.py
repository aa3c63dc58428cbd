"""The transformers quantizer for ``quant_method: "svdquant"`` (T5 / CLIP encoders, any ``PreTrainedModel``).

``SVDQuantConfig`` also subclasses transformers' ``QuantizationConfigMixin`` (see :mod:`.config`), so
one config object serves ``FluxTransformer2DModel.from_pretrained`` and ``T5EncoderModel.from_pretrained``.

transformers v5 loads through its own converter pipeline rather than diffusers' per-parameter hooks:

* quantize on load — :meth:`SVDQuantHfQuantizer._process_model_before_weight_loading` swaps the target
  ``nn.Linear``\\ s (chosen by :func:`~diffusers_svdquant.config.quantizable_linears`, the same rule as
  for diffusers) for meta :class:`SVDQuantLinear` skeletons; ``param_needs_quantization`` marks each
  ``<layer>.weight``, and the loader hands the 16-bit tensor to :class:`SVDQuantQuantize`, which
  returns the canonical tensors instead;
* pre-quantized — ``config.json`` carries ``quantization_config``; the skeletons' canonical tensors
  (``qweight``, ``wscales``, ``smooth``, ``lora_down``, ``lora_up``, ``bias``) are filled by name, float
  ones cast to the model dtype, ``qweight`` left uint8.

While loading, each skeleton also carries a meta ``weight`` placeholder marked as initialized: some
models' ``_init_weights`` read ``child.weight`` of every linear (T5's attention does), and the
placeholder makes that a no-op. It is hidden from ``state_dict`` for pre-quantized loads (so it is not
a "missing" key) and removed once loading ends.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import algorithm
from ..config import SVDQuantConfig
from ..linear import SVDQuantLinear
from .checkpoint_files import check_finite, checkpoint_shapes, read_headers
from .layers import (
    OnLoadQuantizer,
    QuantizerTraits,
    check_checkpoint_tensors,
    check_device_map,
    dequantize_,
    load_targets,
    replace_with_skeletons,
)

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer

    TRANSFORMERS_IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # transformers absent or older than v5: diffusers support must still load
    ConversionOps = HfQuantizer = object  # type: ignore[assignment,misc]  # inert bases, never registered
    TRANSFORMERS_IMPORT_ERROR = e

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def _keep_in_fp32_names(model: nn.Module) -> list[str]:
    """The model's ``_keep_in_fp32_modules(_strict)``: module-name components (T5's ``"wo"``)."""
    names: set[str] = set()
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        names.update(getattr(model, attr, None) or ())
    return sorted(names)


def _placeholder(linear: nn.Linear) -> nn.Parameter:
    """A meta ``[N, K]`` stand-in for ``linear.weight``, marked so transformers' init functions skip it."""
    p = nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)
    p._is_hf_initialized = True
    return p


def _hide_placeholder(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """``state_dict`` post-hook dropping the placeholder, so the loader does not expect it in the file."""
    state_dict.pop(prefix + "weight", None)


class SVDQuantQuantize(ConversionOps):
    """Loader op: a 16-bit ``<layer>.weight`` ``[N, K]`` in, the layer's canonical tensors out.

    Returns ``<layer>.qweight`` uint8 ``[N, K/2]``, ``wscales`` ``[N, K/64]``, ``smooth`` ``[K]``,
    ``lora_down`` ``[K, r]`` and ``lora_up`` ``[N, r]`` in the skeleton's dtype; any other tensor passes
    through. The skeleton's placeholder ``weight`` stays until loading ends; its key is taken off the
    missing list.
    """

    def __init__(self, hf_quantizer: SVDQuantHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, torch.Tensor | list[torch.Tensor]],
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name, _, tensor_name = key.rpartition(".")
            layer = model.get_submodule(module_name)
            if tensor_name != "weight" or not isinstance(layer, SVDQuantLinear):
                out[key] = value
                continue
            q = self.hf_quantizer.quantize_layer(module_name, layer, value)
            out.update({f"{module_name}.{t}": getattr(q, t) for t in layer.QUANT_TENSORS})
            if missing_keys is not None:
                missing_keys.discard(key)
        return out


class SVDQuantHfQuantizer(QuantizerTraits, HfQuantizer):
    """``HfQuantizer`` for SVDQuant W4A4: quantize a transformers model on load, or load a quantized one.

    Linears listed in the model's ``_keep_in_fp32_modules(_strict)`` stay 16-bit, as in the diffusers
    quantizer, so T5's ``wo`` projections are not quantized.
    """

    requires_calibration = False
    quantization_config: SVDQuantConfig

    def __init__(self, quantization_config: SVDQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self._on_load: OnLoadQuantizer | None = None
        self._hide_hooks: list[Any] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_device_map(kwargs.get("device_map"))

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # Recorded like the diffusers quantizer does; a transformers reload takes config.json's `dtype`.
        if not self.pre_quantized and isinstance(dtype, torch.dtype):
            self.quantization_config.torch_dtype = str(dtype).removeprefix("torch.")
        return dtype

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and isinstance(model.get_submodule(module_name), SVDQuantLinear)

    def param_element_size(self, model: PreTrainedModel, param_name: str, param: torch.Tensor) -> float:
        # The placeholder never takes memory; the canonical tensors are counted on their own.
        module_name, _, tensor_name = param_name.rpartition(".")
        if tensor_name == "weight" and isinstance(model.get_submodule(module_name), SVDQuantLinear):
            return 0.0
        return param.element_size()

    def get_quantize_ops(self) -> SVDQuantQuantize:
        return SVDQuantQuantize(self)

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> PreTrainedModel:
        config = self.quantization_config
        keep = _keep_in_fp32_names(model)
        targets = load_targets(model, config, keep, warn_unmatched=not self.pre_quantized)
        self.modules_to_not_convert = list(config.modules_to_not_convert) + keep
        ranks: dict[str, int] | None = None  # pre-quantized: each layer's, read from its tensors (§2)
        if self.pre_quantized:
            ranks = self._check_checkpoint_tensors(model, targets, checkpoint_shapes(read_headers(checkpoint_files)))
        else:
            self._on_load = OnLoadQuantizer(config, model, targets)
        # The meta linears were built in the load dtype (transformers' init context): keep it. Quantize on
        # load: the loader only routes checkpoint names the model exposes, so the placeholder also receives
        # the 16-bit tensor. Pre-quantized: nothing may arrive for it, so it is hidden from the state dict.
        dtype = lambda lin: lin.weight.dtype  # noqa: E731
        skeletons = replace_with_skeletons(model, targets, config, dtype, _placeholder, ranks)
        if self.pre_quantized:
            self._hide_hooks = [layer.register_state_dict_post_hook(_hide_placeholder) for layer in skeletons.values()]
        logger.info("svdquant: %d linears of %s now SVDQuantLinear", len(targets), type(model).__name__)
        return model

    def _check_checkpoint_tensors(
        self, model: nn.Module, targets: dict[str, nn.Linear], shapes: dict[str, tuple[int, ...]] | None
    ) -> dict[str, int] | None:
        """Fail before loading when a quantized layer's tensors are absent from the checkpoint or do not fit it;
        each layer's rank from its tensors (None, i.e. the config's, where the checkpoint is not safetensors)."""
        if shapes is None:
            return None  # not safetensors: the after-load check still catches missing ones
        prefix = getattr(model, "base_model_prefix", "") + "."

        def shape_of(key: str) -> tuple[int, ...] | None:
            # The loader also accepts names with the base-model prefix added or removed.
            for k in (key, prefix + key, key.removeprefix(prefix)):
                if k in shapes:
                    return shapes[k]
            return None

        return check_checkpoint_tensors(targets, self.quantization_config, shape_of)

    def quantize_layer(
        self, module_name: str, layer: SVDQuantLinear, weight: torch.Tensor
    ) -> algorithm.QuantizedWeight:
        """SVDQuant one 16-bit weight ``[N, K]`` with the config and the layer's calibration absmax.

        Returns the canonical tensors in ``layer``'s dtype, on ``weight``'s device.
        """
        return self._on_load.quantize(module_name, layer, weight)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        for hook in self._hide_hooks:
            hook.remove()
        self._hide_hooks = []
        self._on_load = OnLoadQuantizer.finish(self._on_load)  # the model keeps this quantizer: unpin the stats
        for name, module in model.named_modules():
            if not isinstance(module, SVDQuantLinear):
                continue
            module._parameters.pop("weight", None)
            # The loader flags every tensor it set; one it did not set was missing from the checkpoint and
            # is an uninitialized stand-in. (Meta tensors are accelerate's offloaded ones, loaded elsewhere.)
            unloaded = [
                t
                for t, p in module.named_parameters(recurse=False)
                if p.device.type != "meta" and not getattr(p, "_is_hf_initialized", False)
            ]
            if not self.pre_quantized and set(unloaded) & set(module.QUANT_TENSORS):
                raise ValueError(f"svdquant: the checkpoint has no weight for layer {name!r} to quantize")
            if unloaded:
                raise ValueError(
                    f"svdquant checkpoint is missing {', '.join(f'{name}.{t}' for t in unloaded)} for "
                    f"quantized layer {name!r}"
                )
            # The loader makes float parameters trainable; these are frozen quantized data.
            module.requires_grad_(False)
        check_finite(model)
        return model

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        return dequantize_(model, dtype)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True
