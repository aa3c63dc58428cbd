"""The native boundary: ``torch.library`` custom ops over the ``_C`` kernels.

Each op has one schema, a fake (meta) implementation so ``torch.compile(fullgraph=True)`` traces
through it, a default implementation that runs :mod:`diffusers_svdquant.reference` on any device,
and a CPU kernel from ``_C`` when the extension is built. Nothing else in the package touches
``_C``: it passes ``data_ptr()``s and shapes, never torch objects.

Environment:
    ``SVDQ_CPU_ISA``: force a CPU instruction path (``generic``, ``avx2``, ``avxvnni``,
    ``avx512vnni``) at import; an unknown or unsupported name is ignored with a warning.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch

from . import reference

try:
    from . import _C  # type: ignore[attr-defined]

    _NATIVE_ERROR: Exception | None = None
except ImportError as e:  # importing the package never fails because of the native library
    _C = None
    _NATIVE_ERROR = e

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def native_available() -> bool:
    """True when the ``_C`` extension was built and imported."""
    return _C is not None


def native_error() -> Exception | None:
    """Why ``_C`` failed to import, or None."""
    return _NATIVE_ERROR


def supported_cpu_isas() -> list[str]:
    """CPU instruction paths this machine can run, ``"generic"`` first (``[]`` without ``_C``)."""
    return list(_C.supported_cpu_isas()) if _C is not None else []


def known_cpu_isas() -> list[str]:
    """CPU instruction paths compiled into ``_C`` (``[]`` without it), runnable here or not."""
    return list(_C.known_cpu_isas()) if _C is not None else []


def cpu_isa() -> str | None:
    """The CPU instruction path in use, or None without ``_C``."""
    return _C.cpu_isa() if _C is not None else None


def set_cpu_isa(name: str) -> None:
    """Select a CPU instruction path; ``ValueError`` if this CPU cannot run it."""
    if _C is None:
        raise RuntimeError(f"diffusers_svdquant._C is not available: {_NATIVE_ERROR}")
    _C.set_cpu_isa(name)


if _C is not None and os.environ.get("SVDQ_CPU_ISA"):
    try:
        set_cpu_isa(os.environ["SVDQ_CPU_ISA"])
    except ValueError as e:
        warnings.warn(f"SVDQ_CPU_ISA ignored: {e}", RuntimeWarning, stacklevel=1)


def _check_quantize_act_args(x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"quantize_act: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    k = x.shape[1]
    if k % reference.GROUP_SIZE:
        raise ValueError(f"quantize_act: K={k} is not a multiple of the group size {reference.GROUP_SIZE}")
    if smooth.shape != (k,):
        raise ValueError(f"quantize_act: smooth has shape {tuple(smooth.shape)}, expected [{k}]")
    if lora_down.dim() != 2 or lora_down.shape[0] != k:
        raise ValueError(f"quantize_act: lora_down has shape {tuple(lora_down.shape)}, expected [{k}, r]")
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"quantize_act: x has dtype {x.dtype}; expected float32, bfloat16 or float16")


@torch.library.custom_op("svdquant::quantize_act", mutates_args=())
def quantize_act(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth, INT4-quantize per 64-group and down-project activations (see ``reference.quantize_act``).

    Args:
        x: ``[M, K]`` float32 / bfloat16 / float16.
        smooth: ``[K]``.
        lora_down: ``[K, r]``.

    Returns:
        ``(q_x, s_x, lora_act)``: uint8 ``[M, K/2]``, float32 ``[M, K/64]``, float32 ``[M, r]``.
    """
    _check_quantize_act_args(x, smooth, lora_down)
    return _reference_quantize_act(x, smooth, lora_down)


def _reference_quantize_act(x, smooth, lora_down):
    # The fake says the outputs are contiguous; a transposed x would make the reference's strided.
    return reference.quantize_act(x.contiguous(), smooth, lora_down)


@quantize_act.register_fake
def _(x, smooth, lora_down):
    _check_quantize_act_args(x, smooth, lora_down)
    m, k = x.shape
    return (
        x.new_empty(m, k // 2, dtype=torch.uint8),
        x.new_empty(m, k // reference.GROUP_SIZE, dtype=torch.float32),
        x.new_empty(m, lora_down.shape[1], dtype=torch.float32),
    )


@quantize_act.register_kernel("cpu")
def _(x, smooth, lora_down):
    _check_quantize_act_args(x, smooth, lora_down)
    if _C is None:
        _warn_once("quantize_act", f"diffusers_svdquant._C unavailable ({_NATIVE_ERROR}); using reference.py")
        return _reference_quantize_act(x, smooth, lora_down)
    m, k = x.shape
    r = lora_down.shape[1]
    # The kernel reads all three in one dtype; float32 holds each of them exactly, so mixed inputs give
    # the reference's result (which computes in float32) rather than a rounded variant.
    x, smooth, lora_down = _in_one_dtype(x, smooth, lora_down)
    q_x = torch.empty(m, k // 2, dtype=torch.uint8)
    s_x = torch.empty(m, k // reference.GROUP_SIZE, dtype=torch.float32)
    lora_act = torch.empty(m, r, dtype=torch.float32)
    _C.quantize_act(
        x.data_ptr(), smooth.data_ptr(), lora_down.data_ptr(),
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(),
        m, k, r, _DTYPE_CODES[x.dtype], reference.GROUP_SIZE, torch.get_num_threads(),
    )  # fmt: skip
    return q_x, s_x, lora_act


def _check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias) -> None:
    for name, t in (("q_x", q_x), ("s_x", s_x), ("q_w", q_w), ("s_w", s_w), ("lora_act", lora_act),
                    ("lora_up", lora_up)):  # fmt: skip
        if t.dim() != 2:
            raise ValueError(f"gemm_w4a4: {name} must be 2-D, got shape {tuple(t.shape)}")
    m, kh = q_x.shape
    if (2 * kh) % reference.GROUP_SIZE:
        raise ValueError(
            f"gemm_w4a4: q_x has shape {tuple(q_x.shape)}: K = {2 * kh} is not a multiple of {reference.GROUP_SIZE}"
        )
    n = q_w.shape[0]
    groups = 2 * kh // reference.GROUP_SIZE
    for name, t, shape in (
        ("s_x", s_x, (m, groups)),
        ("q_w", q_w, (n, kh)),
        ("s_w", s_w, (n, groups)),
        ("lora_act", lora_act, (m, lora_up.shape[-1])),
        ("lora_up", lora_up, (n, lora_act.shape[-1])),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"gemm_w4a4: {name} has shape {tuple(t.shape)}, expected {list(shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"gemm_w4a4: bias has shape {tuple(bias.shape)}, expected [{n}]")
    if q_x.dtype != torch.uint8 or q_w.dtype != torch.uint8:
        raise ValueError(f"gemm_w4a4: q_x and q_w must be uint8, got {q_x.dtype} and {q_w.dtype}")


@torch.library.custom_op("svdquant::gemm_w4a4", mutates_args=())
def gemm_w4a4(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    q_w: torch.Tensor,
    s_w: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W4A4 per-group GEMM with the low-rank and bias epilogue (see ``reference.gemm_w4a4``).

    Args:
        q_x: uint8 ``[M, K/2]``; s_x: float32 ``[M, K/64]``.
        q_w: uint8 ``[N, K/2]``; s_w: ``[N, K/64]``.
        lora_act: float32 ``[M, r]``; lora_up: ``[N, r]``; bias: ``[N]`` or None.
        out_dtype: dtype of the result.

    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    _check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype)


@gemm_w4a4.register_fake
def _(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype):
    _check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    return q_x.new_empty(q_x.shape[0], q_w.shape[0], dtype=out_dtype)


@gemm_w4a4.register_kernel("cpu")
def _(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype):
    _check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    if _C is None:
        _warn_once("gemm_w4a4", f"diffusers_svdquant._C unavailable ({_NATIVE_ERROR}); using reference.py")
        return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype)
    m, kh = q_x.shape
    n, r = q_w.shape[0], lora_act.shape[1]
    s_w, lora_up, bias = _in_one_dtype(s_w, lora_up, bias)
    # Every temporary is bound to a name: a pointer taken from an unnamed one dangles once it is freed.
    q_x, s_x, lora_act, q_w = (
        q_x.contiguous(),
        s_x.float().contiguous(),
        lora_act.float().contiguous(),
        q_w.contiguous(),
    )
    # The kernel writes float32, bfloat16 and float16 itself (rounded once, as .to() would).
    y = torch.empty(m, n, dtype=out_dtype if out_dtype in _DTYPE_CODES else torch.float32)
    _C.gemm_w4a4(
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(), q_w.data_ptr(), s_w.data_ptr(),
        lora_up.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
        m, n, 2 * kh, r, _DTYPE_CODES[s_w.dtype], _DTYPE_CODES[y.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return y.to(out_dtype)


def _in_one_dtype(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Contiguous, in one dtype the kernel reads: their common one, else float32 (which holds each of
    bfloat16 / float16 / float32 exactly, so the result does not change)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _DTYPE_CODES else torch.float32
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _check_linear_args(x, qweight, wscales, smooth, lora_down, lora_up, bias) -> None:
    _check_quantize_act_args(x, smooth, lora_down)
    m, k = x.shape
    if qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ValueError(f"svdquant_linear: qweight has shape {tuple(qweight.shape)}, expected [N, {k // 2}]")
    n = qweight.shape[0]
    if lora_up.dim() != 2 or lora_up.shape != (n, lora_down.shape[1]):
        raise ValueError(
            f"svdquant_linear: lora_up has shape {tuple(lora_up.shape)}, expected [{n}, {lora_down.shape[1]}]"
        )
    if wscales.shape != (n, k // reference.GROUP_SIZE):
        raise ValueError(
            f"svdquant_linear: wscales has shape {tuple(wscales.shape)}, expected [{n}, {k // reference.GROUP_SIZE}]"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"svdquant_linear: bias has shape {tuple(bias.shape)}, expected [{n}]")
    if qweight.dtype != torch.uint8:
        raise ValueError(f"svdquant_linear: qweight must be uint8, got {qweight.dtype}")


@torch.library.custom_op("svdquant::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A whole SVDQuant linear as one op (``reference.svdquant_linear``): ``[M, K]`` → ``[M, N]`` in ``x.dtype``.

    Args:
        x: ``[M, K]`` float32 / bfloat16 / float16.
        qweight, wscales, smooth, lora_down, lora_up, bias: the canonical tensors (DESIGN.md §2):
            uint8 ``[N, K/2]``, ``[N, K/64]``, ``[K]``, ``[K, r]``, ``[N, r]``, ``[N]`` or None.
    """
    _check_linear_args(x, qweight, wscales, smooth, lora_down, lora_up, bias)
    q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
    return torch.ops.svdquant.gemm_w4a4(q_x, s_x, qweight, wscales, lora_act, lora_up, bias, x.dtype)


@linear.register_fake
def _(x, qweight, wscales, smooth, lora_down, lora_up, bias):
    _check_linear_args(x, qweight, wscales, smooth, lora_down, lora_up, bias)
    return x.new_empty(x.shape[0], qweight.shape[0])


@linear.register_kernel("cpu")
def _(x, qweight, wscales, smooth, lora_down, lora_up, bias):
    _check_linear_args(x, qweight, wscales, smooth, lora_down, lora_up, bias)
    if _C is None:
        _warn_once("linear", f"diffusers_svdquant._C unavailable ({_NATIVE_ERROR}); using reference.py")
        return reference.svdquant_linear(x.contiguous(), qweight, wscales, smooth, lora_down, lora_up, bias)
    m, k = x.shape
    n, r = qweight.shape[0], lora_down.shape[1]
    # One native call reads every float tensor in one dtype: x's when they all share it.
    xs, sm, ld, ws, lu, b = _in_one_dtype(x, smooth, lora_down, wscales, lora_up, bias)
    qw = qweight.contiguous()  # named: see gemm_w4a4's CPU kernel
    y = torch.empty(m, n, dtype=xs.dtype)
    _C.linear(
        xs.data_ptr(), sm.data_ptr(), ld.data_ptr(), qw.data_ptr(), ws.data_ptr(), lu.data_ptr(),
        0 if b is None else b.data_ptr(), y.data_ptr(), m, n, k, r, _DTYPE_CODES[xs.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return y.to(x.dtype)  # a no-op unless x's dtype was unified away (mixed dtypes compute in float32)


class PackedGemmWeights(NamedTuple):
    """A quantized linear's weights in the CPU GEMM's tile layout (``cpp/cpu/gemm_layout.h``).

    The kernels build this layout themselves from the canonical tensors on every call; these
    torch functions are its specification, which the native packing is tested against.

    Attributes:
        wq: int8 ``[T, K/64, 1024]``, T = ceil(N / 16): the codes of 16 columns x 64 k per block, ordered
            ``[k4, half, column, j]`` (k = 4·k4 + j, column = 8·half + c).
        wsum: int16 ``[T, K/64, 16]``: −8·Σ of each column's codes in the group (0 in padding columns).
        sw: float32 ``[T, K/64, 16]`` weight scales (0 in padding columns).
        lora_up: float32 ``[T, r, 16]``.
        bias: float32 ``[T * 16]`` or None.
        n: N, the number of real output columns.
    """

    wq: torch.Tensor
    wsum: torch.Tensor
    sw: torch.Tensor
    lora_up: torch.Tensor
    bias: torch.Tensor | None
    n: int


_TILE_N = 16
_TILE_BYTES = 1024 + 32  # per (tile, group): the codes, then the int16 sums (gemm_layout.h)


def pack_gemm_weights(
    qweight: torch.Tensor, wscales: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None
) -> PackedGemmWeights:
    """The CPU GEMM's tile layout of canonical weights (uint8 ``[N, K/2]``, ``[N, K/64]``, ``[N, r]``, ``[N]``)."""
    n, kh = qweight.shape
    k, r = 2 * kh, lora_up.shape[1]
    g, t = k // reference.GROUP_SIZE, math.ceil(n / _TILE_N)
    pad = t * _TILE_N - n
    # Padding columns get code 0 and scale 0: they contribute exactly 0.
    codes = torch.nn.functional.pad(reference.unpack_int4(qweight), (0, 0, 0, pad))  # int8 [t*16, K]
    wq = codes.view(t, 2, 8, g, 16, 4).permute(0, 3, 4, 1, 2, 5).reshape(t, g, 1024).contiguous()
    wsum = (-8 * codes.view(t, _TILE_N, g, 64).sum(-1, dtype=torch.int32)).to(torch.int16).transpose(1, 2)

    def columns_last(v: torch.Tensor) -> torch.Tensor:  # [N, X] -> float32 [t, X, 16]
        v = torch.nn.functional.pad(v.float(), (0, 0, 0, pad))
        return v.view(t, _TILE_N, v.shape[1]).permute(0, 2, 1).contiguous()

    return PackedGemmWeights(
        wq=wq,
        wsum=wsum.contiguous(),
        sw=columns_last(wscales),
        lora_up=columns_last(lora_up) if r else lora_up.new_zeros(t, 0, _TILE_N, dtype=torch.float32),
        bias=None if bias is None else torch.nn.functional.pad(bias.float(), (0, pad)),
        n=n,
    )


def unpack_gemm_weights(
    wq: torch.Tensor, wsum: torch.Tensor, sw: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`pack_gemm_weights`: canonical ``(qweight, wscales, lora_up, bias)`` (floats as
    float32). ``wsum`` is redundant with ``wq`` and not read."""
    t, g, _ = wq.shape
    codes = wq.view(t, g, 16, 2, 8, 4).permute(0, 3, 4, 1, 2, 5).reshape(t * _TILE_N, g * 64)[:n]
    cols = lambda v: v.permute(0, 2, 1).reshape(t * _TILE_N, v.shape[1])[:n]  # noqa: E731
    return reference.pack_int4(codes.contiguous()), cols(sw), cols(lora_up), None if bias is None else bias[:n]


def native_gemm_tiles(
    qweight: torch.Tensor, wscales: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None
) -> PackedGemmWeights:
    """The tile layout as the selected native CPU path builds it (``pack_tile``); for tests against
    :func:`pack_gemm_weights`. A missing bias comes back as zeros (what the kernel adds)."""
    if _C is None:
        raise RuntimeError(f"diffusers_svdquant._C is not available: {_NATIVE_ERROR}")
    n, kh = qweight.shape
    g, r, t = 2 * kh // reference.GROUP_SIZE, lora_up.shape[1], math.ceil(n / _TILE_N)
    ws, lu, b = _in_one_dtype(wscales, lora_up, bias)
    qw = qweight.contiguous()
    wp = torch.empty(t, g * _TILE_BYTES, dtype=torch.uint8)
    fl = torch.empty(t, g + r + 1, _TILE_N, dtype=torch.float32)
    _C.pack_gemm_tiles(
        qw.data_ptr(), ws.data_ptr(), lu.data_ptr(), 0 if b is None else b.data_ptr(),
        wp.data_ptr(), fl.data_ptr(), n, 2 * kh, r, _DTYPE_CODES[ws.dtype],
    )  # fmt: skip
    wq = wp[:, : g * 1024].contiguous().view(torch.int8).view(t, g, 1024)
    wsum = wp[:, g * 1024 :].contiguous().view(torch.int16).view(t, g, _TILE_N)
    return PackedGemmWeights(wq, wsum, fl[:, :g].contiguous(), fl[:, g : g + r].contiguous(), fl[:, -1].reshape(-1), n)


def svdquant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A whole SVDQuant linear: ``[M, K]`` in ``x.dtype`` → ``[M, N]`` in ``x.dtype`` (the ``svdquant::linear`` op).

    Args are the canonical tensors of DESIGN.md §2 (``qweight`` uint8 ``[N, K/2]``, ``wscales``
    ``[N, K/64]``, ``smooth`` ``[K]``, ``lora_down`` ``[K, r]``, ``lora_up`` ``[N, r]``, ``bias`` ``[N]``).
    On CPU it is one native call (quantize_act + GEMM); elsewhere the two ops.
    """
    return torch.ops.svdquant.linear(x, qweight, wscales, smooth, lora_down, lora_up, bias)


def int8_peak_gops(num_threads: int | None = None) -> float:
    """GOP/s of a tight loop of the selected CPU path's int8 instruction (``vpdpbusd`` on the VNNI
    paths, ``vpmaddubsw`` + ``vpmaddwd`` otherwise): the peak the benchmarks compare the GEMM against
    (2 ops per product). ``num_threads`` defaults to ``torch.get_num_threads()``; 0.0 without AVX2.
    """
    if _C is None or "avx2" not in _C.supported_cpu_isas():
        return 0.0
    return _C.int8_peak_gops(torch.get_num_threads() if num_threads is None else num_threads)


# ================================================================================= CUDA (cpp/cuda)
# quantize_act and the W4A4 GEMM on tensor cores (DESIGN.md §4; layouts in cpp/cuda/gemm_w4a4.cu).
# The GEMM reads the weights in the mma-fragment layout of pack_mma_weights, built once per layer
# (SVDQuantLinear caches it, never saves it); the canonical gemm_w4a4 on CUDA tensors packs on the
# fly, so torch.compile graphs (which use the canonical ops) run the kernel too.
#
# Environment: ``SVDQ_CUDA_MMA=auto|s4|s8`` forces the GEMM's tensor-core path at import (s8 runs on
# every sm_80+ GPU, which is how the Hopper path can be tested on an A100/L40).

_MMA_TILE_N = 128  # svdq::cuda::kTileN: output columns per thread block
_MMA_PANEL_BYTES = 2048  # 64 columns x one 64-group of int4
_MMA_PATHS = {"auto": 0, "s4": 1, "s8": 2}
_cuda_mma_path = 0
_cuda_device_paths: dict[int, str] = {}


def cuda_kernels_available() -> bool:
    """True when ``_C`` was built with the CUDA kernels (whether a GPU is present is another matter)."""
    return _C is not None and bool(_C.has_cuda())


def set_cuda_mma_path(name: str) -> None:
    """Force the CUDA GEMM's path: ``"auto"`` (s4 on sm_8x, s8 on sm_90+), ``"s4"`` or ``"s8"``."""
    global _cuda_mma_path
    if name not in _MMA_PATHS:
        raise ValueError(f"unknown CUDA mma path {name!r}; expected one of {sorted(_MMA_PATHS)}")
    _cuda_mma_path = _MMA_PATHS[name]


if os.environ.get("SVDQ_CUDA_MMA"):
    try:
        set_cuda_mma_path(os.environ["SVDQ_CUDA_MMA"])
    except ValueError as e:
        warnings.warn(f"SVDQ_CUDA_MMA ignored: {e}", RuntimeWarning, stacklevel=1)


def cuda_mma_path(device: torch.device | int | None = None) -> str:
    """The GEMM path a CUDA device runs: ``"s4"`` or ``"s8"``, or ``""`` when the kernels cannot run
    there (``_C`` without CUDA, compute capability below 8.0, or a driver older than the CUDA runtime
    ``_C`` was built with; the reason is warned once)."""
    if not cuda_kernels_available():
        return ""
    index = device.index if isinstance(device, torch.device) else device
    if index is None:
        index = torch.cuda.current_device()
    if index not in _cuda_device_paths:
        try:
            _cuda_device_paths[index] = _C.cuda_mma_path(index)
        except RuntimeError as e:
            _warn_once(f"cuda-device-{index}", f"diffusers_svdquant CUDA kernels unusable ({e}); using reference.py")
            _cuda_device_paths[index] = ""
        if not _cuda_device_paths[index]:
            _warn_once(f"cuda-cc-{index}", f"cuda:{index} cannot run the svdquant CUDA kernels; using reference.py")
    auto = _cuda_device_paths[index]
    forced = {v: k for k, v in _MMA_PATHS.items()}[_cuda_mma_path]
    return auto if not auto or forced == "auto" else forced


def _cuda_ready(op: str, device: torch.device) -> bool:
    """Whether the CUDA kernels run on ``device``; if not, say why once (the caller uses reference.py)."""
    if not cuda_kernels_available():
        why = f"diffusers_svdquant._C unavailable ({_NATIVE_ERROR})" if _C is None else "_C built without CUDA"
        _warn_once(f"cuda-{op}", f"{why}; {op} on CUDA uses reference.py")
        return False
    return bool(cuda_mma_path(device))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (the kernels copy 16 bytes at a time)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _same_device(op: str, device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device} like the other inputs")


class MmaPackedWeights(NamedTuple):
    """A quantized linear's weights in the CUDA GEMM's mma-fragment layout (``cpp/cuda/gemm_w4a4.cu``).

    Built from the canonical tensors by :func:`pack_mma_weights` on any device; never saved.
    ``Np`` is N rounded up to 128; padding columns have code 0 and scale 0.

    Attributes:
        wq: uint8 ``[Np/64, K/64, 2048]``: per 64 columns and 64-group, lane ``l``'s 16-byte word ``i`` holds
            the m16n8k64 B fragments ``{b0, b1}`` of column tiles ``2i`` and ``2i+1``.
        sw: float32 ``[K/64, Np]`` weight scales, one row per group.
        lora_up: float32 ``[r, Np]``.
        bias: float32 ``[Np]`` or None.
        n: N, the number of real output columns.
    """

    wq: torch.Tensor
    sw: torch.Tensor
    lora_up: torch.Tensor
    bias: torch.Tensor | None
    n: int


def pack_mma_weights(
    qweight: torch.Tensor, wscales: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None
) -> MmaPackedWeights:
    """Repack canonical weights (uint8 ``[N, K/2]``, ``[N, K/64]``, ``[N, r]``, ``[N]``) for the CUDA GEMM.

    Pure tensor permutations (any device): a canonical row ``n = 64T + 16i + 8p + c`` and byte
    ``32g + 16h + 4t + b`` of a group go to ``wq[T, g]`` at byte ``((32i + 4c + t) * 4 + 2p + h) * 4 + b``,
    i.e. lane ``4c + t``, word ``i``, register ``2p + h`` (B fragment b_h of column tile 2i + p).
    """
    n, kh = qweight.shape
    k = 2 * kh
    if k % reference.GROUP_SIZE:
        raise ValueError(f"pack_mma_weights: qweight has shape {tuple(qweight.shape)}: K = {k} is not a multiple of 64")
    g, r = k // reference.GROUP_SIZE, lora_up.shape[1]
    np_ = math.ceil(n / _MMA_TILE_N) * _MMA_TILE_N
    pad = np_ - n
    q = torch.nn.functional.pad(qweight, (0, 0, 0, pad))  # zero bytes: codes 0
    # [T, i, p, c, G, h, t, b] -> [T, G, i, c, t, p, h, b]
    wq = q.reshape(np_ // 64, 4, 2, 8, g, 2, 4, 4).permute(0, 4, 1, 3, 6, 2, 5, 7)
    wq = wq.reshape(np_ // 64, g, _MMA_PANEL_BYTES).contiguous()

    def rows_by_column(v: torch.Tensor) -> torch.Tensor:  # [N, X] -> float32 [X, Np]
        return torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).t().contiguous()

    return MmaPackedWeights(
        wq=wq,
        sw=rows_by_column(wscales),
        lora_up=rows_by_column(lora_up) if r else lora_up.new_zeros(0, np_, dtype=torch.float32),
        bias=None if bias is None else torch.nn.functional.pad(bias.float(), (0, pad)).contiguous(),
        n=n,
    )


def unpack_mma_weights(
    wq: torch.Tensor, sw: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`pack_mma_weights`: canonical ``(qweight, wscales, lora_up, bias)`` (floats as float32)."""
    t2, g, _ = wq.shape
    np_ = 64 * t2
    q = wq.reshape(t2, g, 4, 8, 4, 2, 2, 4).permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(np_, g * 32)
    return q[:n], sw.t()[:n], lora_up.t()[:n], None if bias is None else bias[:n]


def _check_mma_args(q_x, s_x, lora_act, wq, sw, lora_up, bias, n) -> None:
    op = "gemm_w4a4_mma"
    if q_x.dim() != 2 or wq.dim() != 3 or sw.dim() != 2 or lora_up.dim() != 2:
        raise ValueError(
            f"{op}: q_x, sw, lora_up must be 2-D and wq 3-D, got {tuple(q_x.shape)}, {tuple(sw.shape)}, "
            f"{tuple(lora_up.shape)}, {tuple(wq.shape)}"
        )
    m, kh = q_x.shape
    if q_x.dtype != torch.uint8 or (2 * kh) % reference.GROUP_SIZE:
        raise ValueError(f"{op}: q_x must be uint8 [M, K/2] with K % 64 == 0, got {q_x.dtype} {tuple(q_x.shape)}")
    np_, g = math.ceil(n / _MMA_TILE_N) * _MMA_TILE_N, 2 * kh // reference.GROUP_SIZE
    r = lora_up.shape[0]  # the weights fix the rank; the activations must match it
    for name, x, shape, dtype in (
        ("s_x", s_x, (m, g), torch.float32),
        ("lora_act", lora_act, (m, r), torch.float32),
        ("wq", wq, (np_ // 64, g, _MMA_PANEL_BYTES), torch.uint8),
        ("sw", sw, (g, np_), torch.float32),
        ("lora_up", lora_up, (r, np_), torch.float32),
    ):
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise ValueError(f"{op}: {name} is {x.dtype} {tuple(x.shape)}, expected {dtype} {list(shape)}")
    if bias is not None and (tuple(bias.shape) != (np_,) or bias.dtype != torch.float32):
        raise ValueError(f"{op}: bias is {bias.dtype} {tuple(bias.shape)}, expected float32 [{np_}]")


@torch.library.custom_op("svdquant::gemm_w4a4_mma", mutates_args=())
def gemm_w4a4_mma(
    q_x: torch.Tensor,
    s_x: torch.Tensor,
    lora_act: torch.Tensor,
    wq: torch.Tensor,
    sw: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`gemm_w4a4` on weights packed by :func:`pack_mma_weights` (the CUDA kernel's layout).

    Off CUDA (and without the CUDA kernels) it unpacks and runs ``reference.gemm_w4a4``.

    Args:
        q_x: uint8 ``[M, K/2]``; s_x: float32 ``[M, K/64]``; lora_act: float32 ``[M, r]``.
        wq, sw, lora_up, bias, n: the fields of :class:`MmaPackedWeights`.
        out_dtype: dtype of the result.

    Returns:
        ``[M, n]`` in ``out_dtype``.
    """
    _check_mma_args(q_x, s_x, lora_act, wq, sw, lora_up, bias, n)
    q_w, s_w, up, b = unpack_mma_weights(wq, sw, lora_up, bias, n)
    return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, up, b, out_dtype)


@gemm_w4a4_mma.register_fake
def _(q_x, s_x, lora_act, wq, sw, lora_up, bias, n, out_dtype):
    _check_mma_args(q_x, s_x, lora_act, wq, sw, lora_up, bias, n)
    return q_x.new_empty(q_x.shape[0], n, dtype=out_dtype)


def _cuda_gemm_mma(q_x, s_x, lora_act, wq, sw, lora_up, bias, n, out_dtype) -> torch.Tensor:
    dev = q_x.device
    _same_device("gemm_w4a4_mma", dev, s_x=s_x, lora_act=lora_act, wq=wq, sw=sw, lora_up=lora_up, bias=bias)
    m, kh = q_x.shape
    kernel_dtype = out_dtype if out_dtype in _DTYPE_CODES else torch.float32
    y = torch.empty(m, n, dtype=kernel_dtype, device=dev)
    q_x, s_x, lora_act = _aligned(q_x), s_x.contiguous(), lora_act.contiguous()
    wq, sw, lora_up = _aligned(wq), _aligned(sw), lora_up.contiguous()
    bias = None if bias is None else bias.contiguous()
    _C.cuda_gemm_w4a4(
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(), wq.data_ptr(), sw.data_ptr(), lora_up.data_ptr(),
        0 if bias is None else bias.data_ptr(), y.data_ptr(),
        m, n, 2 * kh, lora_up.shape[0], _DTYPE_CODES[kernel_dtype], _cuda_mma_path, dev.index,
        torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return y if kernel_dtype == out_dtype else y.to(out_dtype)


@gemm_w4a4_mma.register_kernel("cuda")
def _(q_x, s_x, lora_act, wq, sw, lora_up, bias, n, out_dtype):
    _check_mma_args(q_x, s_x, lora_act, wq, sw, lora_up, bias, n)
    if not _cuda_ready("gemm_w4a4_mma", q_x.device):
        q_w, s_w, up, b = unpack_mma_weights(wq, sw, lora_up, bias, n)
        return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, up, b, out_dtype)
    return _cuda_gemm_mma(q_x, s_x, lora_act, wq, sw, lora_up, bias, n, out_dtype)


@gemm_w4a4.register_kernel("cuda")
def _(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype):
    _check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    if not _cuda_ready("gemm_w4a4", q_x.device):
        return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype)
    p = pack_mma_weights(q_w, s_w, lora_up, bias)
    return _cuda_gemm_mma(q_x, s_x.float(), lora_act.float(), p.wq, p.sw, p.lora_up, p.bias, p.n, out_dtype)


@quantize_act.register_kernel("cuda")
def _(x, smooth, lora_down):
    _check_quantize_act_args(x, smooth, lora_down)
    if not _cuda_ready("quantize_act", x.device):
        return _reference_quantize_act(x, smooth, lora_down)
    dev = x.device
    _same_device("quantize_act", dev, smooth=smooth, lora_down=lora_down)
    m, k = x.shape
    r = lora_down.shape[1]
    if not x.dtype == smooth.dtype == lora_down.dtype:
        # As on the CPU: one dtype for all three; float32 holds each exactly, so the result is the reference's.
        x, smooth, lora_down = x.float(), smooth.float(), lora_down.float()
    x, smooth, lora_down = _aligned(x), _aligned(smooth), lora_down.contiguous()
    q_x = torch.empty(m, k // 2, dtype=torch.uint8, device=dev)
    s_x = torch.empty(m, k // reference.GROUP_SIZE, dtype=torch.float32, device=dev)
    lora_act = torch.empty(m, r, dtype=torch.float32, device=dev)
    _C.cuda_quantize_act(
        x.data_ptr(), smooth.data_ptr(), lora_down.data_ptr(), q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(),
        m, k, r, _DTYPE_CODES[x.dtype], dev.index, torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return q_x, s_x, lora_act


def svdquant_linear_mma(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, packed: MmaPackedWeights
) -> torch.Tensor:
    """:func:`svdquant_linear` with the weights in the CUDA GEMM layout (:func:`pack_mma_weights`).

    ``x`` ``[M, K]`` → ``[M, N]`` in ``x.dtype``; ``smooth`` ``[K]``, ``lora_down`` ``[K, r]`` canonical.
    """
    q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
    return torch.ops.svdquant.gemm_w4a4_mma(
        q_x, s_x, lora_act, packed.wq, packed.sw, packed.lora_up, packed.bias, packed.n, x.dtype
    )
