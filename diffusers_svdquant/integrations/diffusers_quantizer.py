"""The diffusers quantizer for ``quant_method: "svdquant"`` (registered by :mod:`.registration`).

Two loading flows share one skeleton (docs/design.md §5):

* quantize on load — the checkpoint holds 16-bit ``weight``\\ s; each target ``nn.Linear`` becomes an
  :class:`SVDQuantLinear` that still exposes a meta ``weight``, and :meth:`create_quantized_param`
  quantizes each weight the moment it is read, so at most one 16-bit layer is alive at a time;
* pre-quantized — ``config.json`` carries ``quantization_config``; the skeleton exposes the canonical
  tensors and the loader fills them by name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from ..config import SVDQuantConfig
from ..dtypes import parse_dtype
from ..linear import SVDQuantLinear
from .checkpoint_files import FiniteCheck, TensorEntry, check_finite, checkpoint_shapes, read_headers
from .layers import (
    OnLoadQuantizer,
    QuantizerTraits,
    check_checkpoint_tensors,
    check_device_map,
    dequantize_,
    load_targets,
    replace_with_skeletons,
)

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

logger = logging.getLogger(__name__)


class SVDQuantDiffusersQuantizer(QuantizerTraits, DiffusersQuantizer):
    """``DiffusersQuantizer`` for SVDQuant W4A4: quantize on load, or load a quantized checkpoint."""

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: SVDQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype | None = None
        self._loaded_keys: set[str] | None = None
        self._on_load: OnLoadQuantizer | None = None
        self._headers: dict[str, dict[str, TensorEntry]] | None = None
        self._finite_check: FiniteCheck | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_device_map(kwargs.get("device_map"))

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        recorded = self.quantization_config.torch_dtype
        recorded = None if recorded is None else parse_dtype(recorded)
        if torch_dtype is None:
            torch_dtype = recorded if (self.pre_quantized and recorded is not None) else torch.float32
        if not self.pre_quantized:
            self.quantization_config.torch_dtype = str(torch_dtype).removeprefix("torch.")
        self.torch_dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self._loaded_keys = set(loaded_keys)
        self._headers = read_headers(checkpoint_files)
        return loaded_keys

    def _process_model_before_weight_loading(
        self, model: ModelMixin, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> None:
        config = self.quantization_config
        targets = load_targets(
            model,
            config,
            keep_in_fp32_modules or [],
            warn_unmatched=not self.pre_quantized,
            keep_top_level_only=config.format_version < 2,
        )
        self.modules_to_not_convert = list(config.modules_to_not_convert) + list(keep_in_fp32_modules or [])
        ranks: dict[str, int] | None = None  # pre-quantized: each layer's, read from its tensors (§2)
        if self.pre_quantized and self._headers is not None:
            ranks = check_checkpoint_tensors(targets, config, checkpoint_shapes(self._headers).get)
        elif self.pre_quantized and self._loaded_keys is not None:
            ranks = check_checkpoint_tensors(targets, config, lambda key: () if key in self._loaded_keys else None)
        elif not self.pre_quantized:
            self._on_load = OnLoadQuantizer(config, model, targets)
        if self.pre_quantized and self._headers is not None:
            # Started now, it runs on another core while diffusers reads the weights (docs/design.md §5).
            self._finite_check = FiniteCheck(self._headers, set(targets))
        dtype = self.torch_dtype or torch.float32

        def placeholder(linear: nn.Linear) -> nn.Parameter:
            # Receives the 16-bit tensor that create_quantized_param turns into the canonical ones.
            return nn.Parameter(torch.empty(linear.out_features, linear.in_features, dtype=dtype, device="meta"),
                                requires_grad=False)  # fmt: skip

        replace_with_skeletons(
            model, targets, config, lambda _: dtype, None if self.pre_quantized else placeholder, ranks
        )
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
        q = self._on_load.quantize(module_name, layer, param_value.to(device))
        # The bias, if any, is loaded by name like any other tensor.
        layer.load_quantized(q, None)
        del layer.weight

    def update_missing_keys(self, model: ModelMixin, missing_keys: list[str], prefix: str) -> list[str]:
        if self.pre_quantized:
            return missing_keys
        produced = {
            f"{name}.{t}" for name, m in model.named_modules() if isinstance(m, SVDQuantLinear) for t in m.QUANT_TENSORS
        }
        return [k for k in missing_keys if k not in produced]

    def _process_model_after_weight_loading(self, model: ModelMixin, **kwargs: Any) -> ModelMixin:
        self._on_load = OnLoadQuantizer.finish(self._on_load)  # the model keeps this quantizer: unpin the stats
        loaded = []  # the float tensors check_finite reads, gathered in the one walk over the layers
        for name, module in model.named_modules():
            if not isinstance(module, SVDQuantLinear):
                continue
            if "weight" in module._parameters:
                raise ValueError(f"svdquant: the checkpoint has no weight for layer {name!r}; it cannot be quantized")
            for t, p in module._parameters.items():
                if p is not None and p.device.type == "meta":
                    raise ValueError(f"svdquant: {name}.{t} was not loaded from the checkpoint")
                if p is not None and p.is_floating_point():
                    loaded.append((f"{name}.{t}", p))
        started, self._finite_check, self._headers = self._finite_check, None, None
        check_finite(model, started, loaded)
        return model

    def _dequantize(self, model: ModelMixin) -> ModelMixin:
        return dequantize_(model)

    @property
    def is_serializable(self) -> bool:
        return True
