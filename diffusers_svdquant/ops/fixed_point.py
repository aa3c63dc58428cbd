"""The fixed-point ``XᵀX`` add of calibration (:func:`reference.fixed_point_add`) on its kernels: the CPU one
(cpp/cpu/fixedpoint.cpp), the CUDA one (cpp/cuda/fixedpoint.cu), else the reference.

Converting an item is memory-bound: the kernels read 12 bytes and write 8 per packed entry, where the reference's
torch chain (float64 temporaries, the shifts, the checks) moves about a hundred; on this project's CPU the kernel
takes 1.5–1.6 ns per entry against the chain's 10–23 (benchmarks/RESULTS.md). The integers are the same bits.
"""

from __future__ import annotations

import torch

from .. import reference
from . import native
from .cuda import cuda_mma_path

# Shifts −(s_j + s_l + o) stay far inside float64's exponent range, where 2^shift scales an item exactly.
EXPONENT_LIMIT = 512


def _check(ints: torch.Tensor, item: torch.Tensor, exponents: torch.Tensor, offset: int) -> int:
    """K of a valid call, or ValueError naming what is wrong."""
    k = exponents.numel()
    n = reference.packed_size(k)
    problems = []
    if exponents.dtype != torch.int64 or exponents.dim() != 1:
        problems.append(f"exponents must be int64 [K], got {exponents.dtype} {list(exponents.shape)}")
    if ints.dtype != torch.int64 or ints.shape != (n,) or not ints.is_contiguous():
        problems.append(f"ints must be contiguous int64 [{n}] (K = {k}, packed), got {ints.dtype} {list(ints.shape)}")
    if item.dtype != torch.float32 or item.shape != (n,):
        problems.append(f"item must be float32 [{n}] (K = {k}, packed), got {item.dtype} {list(item.shape)}")
    if not ints.device == item.device == exponents.device:
        problems.append(f"ints, item and exponents must share a device, got {ints.device}, {item.device}, "
                        f"{exponents.device}")  # fmt: skip
    if not -EXPONENT_LIMIT <= offset <= EXPONENT_LIMIT:
        problems.append(f"offset must be within ±{EXPONENT_LIMIT}, got {offset}")
    if problems:
        raise ValueError("fixed_point_add: " + "; ".join(problems))
    return k


def fixed_point_add(ints: torch.Tensor, item: torch.Tensor, exponents: torch.Tensor, offset: int) -> bool:
    """:func:`reference.fixed_point_add` (the same arguments, result and bits) on the tensors' device: the native
    kernel on the CPU (``torch.get_num_threads()`` threads) or on a GPU the build can run, else the reference.

    Args:
        ints: contiguous int64 ``[P]`` (``P``: the packed size of ``K``), the sum, updated in place.
        item: float32 ``[P]``, finite (not checked here: the caller's one pass over it).
        exponents: int64 ``[K]`` within ±512 (the caller checks once per sum), on the same device.
        offset: within ±512.
    """
    k = _check(ints, item, exponents, offset)
    item = item.contiguous()
    exponents = exponents.contiguous()
    c = native._C
    if c is not None and ints.device.type == "cpu":
        return bool(
            c.fixed_point_add(
                ints.data_ptr(), item.data_ptr(), exponents.data_ptr(), k, offset, torch.get_num_threads()
            )
        )
    if ints.device.type == "cuda" and cuda_mma_path(ints.device):
        ok = torch.ones(1, dtype=torch.int32, device=ints.device)
        c.cuda_fixed_point_add(
            ints.data_ptr(), item.data_ptr(), exponents.data_ptr(), ok.data_ptr(), k, offset, ints.device.index,
            torch.cuda.current_stream(ints.device).cuda_stream,
        )  # fmt: skip
        return bool(ok.item())
    if c is None:
        native.warn_fallback("fixed_point_add")
    return reference.fixed_point_add(ints, item, exponents, offset)
