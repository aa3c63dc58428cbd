"""diffusers-svdquant: SVDQuant W4A4 quantization for diffusers models, on CPUs and NVIDIA GPUs.

``import diffusers_svdquant`` registers ``quant_method: "svdquant"`` with diffusers (and transformers), so both
``Model.from_pretrained(repo, quantization_config=SVDQuantConfig(...))`` (quantize on load) and
``Model.from_pretrained(quantized_repo)`` (pre-quantized) work, and routes PEFT's LoRA layers for
:class:`SVDQuantLinear` to :class:`SVDQuantLoraLinear`, so ``pipe.load_lora_weights(...)`` works on quantized models.

The package's folders are its architecture (docs/design.md §3), data flowing one way:
the runtime here (``config``, the math in ``reference`` and ``algorithm``, ``ops``, the layer in
``linear``) <- ``calibration`` <- ``integrations`` (the loaders) <- ``hub`` <- ``apps`` (the
``svdquant`` command, the demo, the quality report), which import the library and are never imported by it.
"""

from . import ops
from .calibration import CalibrationStats, calibrate
from .config import (
    DEFAULT_MODULES_TO_NOT_CONVERT,
    DEFAULT_RANK,
    DEFAULT_WEIGHT_ONLY_MODULES,
    SVDQuantConfig,
    SVDQuantMethod,
)
from .integrations.diffusers_quantizer import SVDQuantDiffusersQuantizer
from .integrations.layers import dequantize_, quantize_

try:
    from .integrations.peft import SVDQuantLoraLinear, register_peft
except Exception as e:  # peft (or the transformers it imports) unusable: quantization still works, LoRA does not
    PEFT_IMPORT_ERROR: Exception | None = e
    SVDQuantLoraLinear = None  # type: ignore[assignment,misc]

    def register_peft() -> None:
        """PEFT is unavailable here (see ``PEFT_IMPORT_ERROR``): nothing to register."""

else:
    PEFT_IMPORT_ERROR = None
from .integrations.registration import register
from .integrations.transformers_quantizer import SVDQuantHfQuantizer
from .linear import SVDQuantLinear, W4A16Linear

__version__ = "0.1.0"

__all__ = [
    "CalibrationStats",
    "calibrate",
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "DEFAULT_WEIGHT_ONLY_MODULES",
    "DEFAULT_RANK",
    "dequantize_",
    "SVDQuantConfig",
    "SVDQuantDiffusersQuantizer",
    "SVDQuantHfQuantizer",
    "SVDQuantLinear",
    "W4A16Linear",
    "SVDQuantLoraLinear",
    "SVDQuantMethod",
    "ops",
    "quantize_",
    "register",
    "register_peft",
]

register()
register_peft()
