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
from .integrations.peft_hook import install_when_imported
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
install_when_imported()


def register_peft() -> None:
    """Install the PEFT integration now (importing peft) rather than when peft is first imported; raises what
    importing it raises. Idempotent."""
    from .integrations.peft import register_peft as install

    install()


def __getattr__(name: str) -> object:
    # Lazy: importing peft (for SVDQuantLoraLinear) costs 0.5 s, and installs the integration as it happens.
    if name == "SVDQuantLoraLinear":
        from .integrations.peft import SVDQuantLoraLinear

        return SVDQuantLoraLinear
    if name == "PEFT_IMPORT_ERROR":
        from .integrations import peft_hook

        return peft_hook.install_error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
