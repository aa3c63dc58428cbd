"""The CUDA kernel of the weight-only op ``svdquant::linear_w4a16`` (cpp/cuda/gemv_w4a16.cu, gemm_w4a16.cu;
docs/design.md §4).

It reads the canonical tensors directly (no repacked weight layout, nothing cached): up to 16 rows a GEMV
that streams the 4-bit codes once with float32 FMAs, above that an mma.sync GEMM on 16-bit tensor cores
(float32 accumulators). x float32, mixed float dtypes, K = 0, or a ``_C`` / device that cannot run the kernels
go through :func:`diffusers_svdquant.reference.linear_w4a16` (said once).

Environment: ``SVDQ_CUDA_W4A16=auto|gemv|gemm|reference`` forces the kernel at import (``gemv`` only up to 16
rows); ``reference`` runs ``reference.linear_w4a16`` on the GPU instead of the native kernels, a way around them
should they misbehave on a GPU they have not been run on yet.
"""

from __future__ import annotations

import functools

import torch

from .. import reference
from . import native
from .cuda import _aligned, _cuda_ready, _same_device
from .weight_only import check_linear_w4a16_args, linear_w4a16

GEMV_MAX_ROWS = 16  # svdq::cuda::kW4A16GemvMaxRows
_PATHS = {"auto": 0, "gemv": 1, "gemm": 2, "reference": -1}  # the kernels' path codes; -1: no kernel
_path = 0
_sms: dict[int, int] = {}


def set_cuda_w4a16_path(name: str) -> None:
    """Force the W4A16 CUDA kernel: ``"auto"`` (GEMV up to 16 rows, GEMM above), ``"gemv"`` or ``"gemm"``; or
    ``"reference"``: no native kernel, ``reference.linear_w4a16`` on the GPU."""
    global _path
    if name not in _PATHS:
        raise ValueError(f"unknown W4A16 CUDA path {name!r}; expected one of {sorted(_PATHS)}")
    _path = _PATHS[name]


native.apply_env("SVDQ_CUDA_W4A16", set_cuda_w4a16_path)


def cuda_w4a16_path() -> str:
    """The forced W4A16 kernel (``"auto"``, ``"gemv"``, ``"gemm"`` or ``"reference"``)."""
    return {v: k for k, v in _PATHS.items()}[_path]


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(index: int) -> int:
    if index not in _sms:
        _sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sms[index]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=1024)
def _workspace_bytes(m: int, n: int, k: int, r: int, path: int, sms: int) -> int:
    return native._C.cuda_w4a16_plan(m, n, k, r, path, sms)["bytes"]


def _path_for(m: int) -> int:
    # A forced GEMV takes at most 16 rows; larger inputs run the GEMM rather than fail.
    return 0 if _path == _PATHS["gemv"] and m > GEMV_MAX_ROWS else _path


def _native_inputs(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias) -> bool:
    """Whether the kernels take these inputs: x 16-bit with every float tensor in its dtype, K > 0."""
    floats = (wscales, wmins, smooth, lora_down, lora_up) + (() if bias is None else (bias,))
    return x.dtype in (torch.bfloat16, torch.float16) and all(t.dtype == x.dtype for t in floats) and x.shape[1] > 0


def _cuda_linear_w4a16(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias) -> torch.Tensor:
    dev = x.device
    m, k = x.shape
    n, r = qweight.shape[0], lora_down.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    if m == 0 or n == 0:
        return y
    index = _device_index(dev)
    path, sms = _path_for(m), _sm_count(index)
    workspace = torch.empty(_workspace_bytes(m, n, k, r, path, sms), dtype=torch.uint8, device=dev)
    x, qweight, smooth, workspace = _aligned(x), _aligned(qweight), _aligned(smooth), _aligned(workspace)
    wscales, wmins = wscales.contiguous(), wmins.contiguous()
    lora_down, lora_up = lora_down.contiguous(), lora_up.contiguous()
    bias = None if bias is None else bias.contiguous()
    native._C.cuda_linear_w4a16(
        x.data_ptr(), qweight.data_ptr(), wscales.data_ptr(), wmins.data_ptr(), smooth.data_ptr(),
        lora_down.data_ptr(), lora_up.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
        workspace.data_ptr(), workspace.numel(), m, n, k, r, native.DTYPE_CODES[x.dtype], path, sms, index,
        _stream(dev),
    )  # fmt: skip
    return y


@linear_w4a16.register_kernel("cuda")
def linear_w4a16_cuda(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias):
    """``svdquant::linear_w4a16`` on CUDA tensors: the native kernels, else ``reference.linear_w4a16``."""
    check_linear_w4a16_args(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    _same_device(
        "linear_w4a16", x.device, qweight=qweight, wscales=wscales, wmins=wmins, smooth=smooth,
        lora_down=lora_down, lora_up=lora_up, bias=bias,
    )  # fmt: skip
    args = (x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    if _path == _PATHS["reference"] or not _cuda_ready("linear_w4a16", x.device):
        return reference.linear_w4a16(*args)
    if not _native_inputs(*args):
        native.warn_once(
            "cuda-linear_w4a16-dtype",
            "linear_w4a16 on CUDA: the kernels take K > 0 and bfloat16 / float16 x with every float tensor in "
            f"its dtype (got K={x.shape[1]}, x {x.dtype}, wscales {wscales.dtype}); using reference.py",
        )
        return reference.linear_w4a16(*args)
    return _cuda_linear_w4a16(*args)
