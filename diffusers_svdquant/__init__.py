"""diffusers-svdquant: SVDQuant W4A4 quantization for diffusers models, on CPUs and NVIDIA GPUs.

``import diffusers_svdquant`` registers ``quant_method: "svdquant"`` with diffusers, so both
``Model.from_pretrained(repo, quantization_config=SVDQuantConfig(...))`` (quantize on load) and
``Model.from_pretrained(quantized_repo)`` (pre-quantized) work.
"""

from . import ops
from .calibration import CalibrationStats, calibrate
from .config import DEFAULT_MODULES_TO_NOT_CONVERT, SVDQuantConfig, SVDQuantMethod
from .linear import SVDQuantLinear
from .quantizer import SVDQuantDiffusersQuantizer, quantize_, register

__version__ = "0.1.0"

__all__ = [
    "CalibrationStats",
    "calibrate",
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "SVDQuantConfig",
    "SVDQuantDiffusersQuantizer",
    "SVDQuantLinear",
    "SVDQuantMethod",
    "ops",
    "quantize_",
    "register",
]

register()
