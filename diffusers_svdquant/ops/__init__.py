"""The native boundary: ``torch.library`` custom ops over the ``_C`` kernels (docs/design.md §4).

* :mod:`.native` loads ``_C`` (the only module that imports it) and picks the CPU instruction path
  (``SVDQ_CPU_ISA=generic|avx2|avxvnni|avx512vnni|avx512bf16|amx`` forces one at import);
* :mod:`.canonical` defines the ops on the canonical tensors (``quantize_act``, ``gemm_w4a4``,
  ``linear``) with their fakes, reference defaults and CPU kernels, and ``linear``'s backward w.r.t. its input;
* :mod:`.weight_only` defines the weight-only op ``linear_w4a16`` the same way;
* :mod:`.cuda` adds the CUDA kernels and the mma-fragment weight layout they read;
* :mod:`.cuda_w4a16` adds the CUDA kernel of ``linear_w4a16`` (GEMV for small M, mma GEMM above);
* :mod:`.fixed_point` runs calibration's exact ``XᵀX`` add (``fixed_point_add``) on the CPU or CUDA kernel.

Nothing outside this package calls ``_C``.
"""

from .canonical import dequantized_w4a4, gemm_w4a4, linear, quantize_act, svdquant_linear
from .cuda import (
    MmaPackedWeights,
    cuda_kernels_available,
    cuda_mma_path,
    gemm_w4a4_mma,
    pack_mma_weights,
    set_cuda_mma_path,
    svdquant_linear_mma,
    unpack_mma_weights,
)
from .cuda_w4a16 import cuda_w4a16_path, set_cuda_w4a16_path
from .fixed_point import fixed_point_add
from .native import (
    FiniteScan,
    cpu_isa,
    first_nonfinite,
    int8_peak_gops,
    known_cpu_isas,
    native_available,
    native_error,
    set_cpu_isa,
    supported_cpu_isas,
)
from .weight_only import linear_w4a16

__all__ = [
    "FiniteScan",
    "MmaPackedWeights",
    "cpu_isa",
    "cuda_kernels_available",
    "cuda_mma_path",
    "cuda_w4a16_path",
    "dequantized_w4a4",
    "first_nonfinite",
    "fixed_point_add",
    "gemm_w4a4",
    "gemm_w4a4_mma",
    "int8_peak_gops",
    "known_cpu_isas",
    "linear",
    "linear_w4a16",
    "native_available",
    "native_error",
    "pack_mma_weights",
    "quantize_act",
    "set_cpu_isa",
    "set_cuda_mma_path",
    "set_cuda_w4a16_path",
    "supported_cpu_isas",
    "svdquant_linear",
    "svdquant_linear_mma",
    "unpack_mma_weights",
]
