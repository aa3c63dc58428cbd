"""The CUDA kernels: the mma-fragment weight layout, ``svdquant::gemm_w4a4_mma``, and the CUDA kernels of
the canonical ops (docs/design.md §4; layouts in cpp/cuda/gemm_w4a4.cu).

The GEMM reads the weights in the mma-fragment layout of :func:`pack_mma_weights`, built once per
layer (``SVDQuantLinear`` caches it, never saves it); the canonical ``gemm_w4a4`` on CUDA tensors
packs on the fly, so ``torch.compile`` graphs (which use the canonical ops) run the kernel too.

Environment: ``SVDQ_CUDA_MMA=auto|s4|s8`` forces the GEMM's tensor-core path at import (s8 runs on
every sm_80+ GPU, which is how the Hopper path can be tested on an A100/L40).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import reference
from . import native
from .canonical import (
    check_gemm_args,
    check_quantize_act_args,
    dequantized_w4a4,
    gemm_w4a4,
    input_grad,
    quantize_act,
    reference_quantize_act,
)

_MMA_TILE_N = 128  # svdq::cuda::kTileN: output columns per thread block
_MMA_PANEL_COLS = 64  # output columns of one weight panel: one warp column's share of a block
_MMA_PANEL_BYTES = 2048  # one panel x one group of int4: 64 x 64 / 2
_MMA_PATHS = {"auto": 0, "s4": 1, "s8": 2}
_cuda_mma_path = 0
_cuda_device_paths: dict[int, str] = {}


def cuda_kernels_available() -> bool:
    """True when ``_C`` was built with the CUDA kernels (whether a GPU is present is another matter)."""
    return native._C is not None and bool(native._C.has_cuda())


def set_cuda_mma_path(name: str) -> None:
    """Force the CUDA GEMM's path: ``"auto"`` (s4 on sm_8x, s8 on sm_90+), ``"s4"`` or ``"s8"``."""
    global _cuda_mma_path
    if name not in _MMA_PATHS:
        raise ValueError(f"unknown CUDA mma path {name!r}; expected one of {sorted(_MMA_PATHS)}")
    _cuda_mma_path = _MMA_PATHS[name]


native.apply_env("SVDQ_CUDA_MMA", set_cuda_mma_path)


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
            _cuda_device_paths[index] = native._C.cuda_mma_path(index)
        except RuntimeError as e:
            native.warn_once(
                f"cuda-device-{index}", f"diffusers_svdquant CUDA kernels unusable ({e}); using reference.py"
            )
            _cuda_device_paths[index] = ""
        if not _cuda_device_paths[index]:
            native.warn_once(
                f"cuda-cc-{index}", f"cuda:{index} cannot run the svdquant CUDA kernels; using reference.py"
            )
    auto = _cuda_device_paths[index]
    forced = {v: k for k, v in _MMA_PATHS.items()}[_cuda_mma_path]
    return auto if not auto or forced == "auto" else forced


def _cuda_ready(op: str, device: torch.device) -> bool:
    """Whether the CUDA kernels run on ``device``; if not, say why once (the caller uses reference.py)."""
    if not cuda_kernels_available():
        why = (
            f"diffusers_svdquant._C unavailable ({native.native_error()})"
            if native._C is None
            else "_C built without CUDA"
        )
        native.warn_once(f"cuda-{op}", f"{why}; {op} on CUDA uses reference.py")
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
        raise ValueError(
            f"pack_mma_weights: qweight has shape {tuple(qweight.shape)}: "
            f"K = {k} is not a multiple of {reference.GROUP_SIZE}"
        )
    g, r = k // reference.GROUP_SIZE, lora_up.shape[1]
    np_ = math.ceil(n / _MMA_TILE_N) * _MMA_TILE_N
    pad = np_ - n
    q = torch.nn.functional.pad(qweight, (0, 0, 0, pad))  # zero bytes: codes 0
    # [T, i, p, c, G, h, t, b] -> [T, G, i, c, t, p, h, b]
    wq = q.reshape(np_ // _MMA_PANEL_COLS, 4, 2, 8, g, 2, 4, 4).permute(0, 4, 1, 3, 6, 2, 5, 7)
    wq = wq.reshape(np_ // _MMA_PANEL_COLS, g, _MMA_PANEL_BYTES).contiguous()

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
    np_ = _MMA_PANEL_COLS * t2
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
        raise ValueError(
            f"{op}: q_x must be uint8 [M, K/2] with K % {reference.GROUP_SIZE} == 0, got {q_x.dtype} {tuple(q_x.shape)}"
        )
    np_, g = math.ceil(n / _MMA_TILE_N) * _MMA_TILE_N, 2 * kh // reference.GROUP_SIZE
    r = lora_up.shape[0]  # the weights fix the rank; the activations must match it
    for name, x, shape, dtype in (
        ("s_x", s_x, (m, g), torch.float32),
        ("lora_act", lora_act, (m, r), torch.float32),
        ("wq", wq, (np_ // _MMA_PANEL_COLS, g, _MMA_PANEL_BYTES), torch.uint8),
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
    kernel_dtype = out_dtype if out_dtype in native.DTYPE_CODES else torch.float32
    y = torch.empty(m, n, dtype=kernel_dtype, device=dev)
    q_x, s_x, lora_act = _aligned(q_x), s_x.contiguous(), lora_act.contiguous()
    wq, sw, lora_up = _aligned(wq), _aligned(sw), lora_up.contiguous()
    bias = None if bias is None else bias.contiguous()
    native._C.cuda_gemm_w4a4(
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(), wq.data_ptr(), sw.data_ptr(), lora_up.data_ptr(),
        0 if bias is None else bias.data_ptr(), y.data_ptr(),
        m, n, 2 * kh, lora_up.shape[0], native.DTYPE_CODES[kernel_dtype], _cuda_mma_path, dev.index,
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
    check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    if not _cuda_ready("gemm_w4a4", q_x.device):
        return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype)
    p = pack_mma_weights(q_w, s_w, lora_up, bias)
    return _cuda_gemm_mma(q_x, s_x.float(), lora_act.float(), p.wq, p.sw, p.lora_up, p.bias, p.n, out_dtype)


@quantize_act.register_kernel("cuda")
def _(x, smooth, lora_down):
    check_quantize_act_args(x, smooth, lora_down)
    if not _cuda_ready("quantize_act", x.device):
        return reference_quantize_act(x, smooth, lora_down)
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
    native._C.cuda_quantize_act(
        x.data_ptr(), smooth.data_ptr(), lora_down.data_ptr(), q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(),
        m, k, r, native.DTYPE_CODES[x.dtype], dev.index, torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return q_x, s_x, lora_act


class _MmaLinear(torch.autograd.Function):
    """The CUDA fast path as an autograd function: forward on the packed weights, backward w.r.t. ``x`` through
    the dequantized weight (the same straight-through rule as ``svdquant::linear``'s)."""

    @staticmethod
    def forward(ctx, x, smooth, lora_down, packed):
        ctx.x_dtype, ctx.packed = x.dtype, packed  # frozen weights: no version check needed
        ctx.save_for_backward(smooth, lora_down)
        q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
        return torch.ops.svdquant.gemm_w4a4_mma(
            q_x, s_x, lora_act, packed.wq, packed.sw, packed.lora_up, packed.bias, packed.n, x.dtype
        )

    @staticmethod
    def backward(ctx, grad):
        smooth, lora_down = ctx.saved_tensors
        p = ctx.packed
        qweight, wscales, lora_up, _ = unpack_mma_weights(p.wq, p.sw, p.lora_up, p.bias, p.n)
        w = dequantized_w4a4(qweight, wscales, smooth, lora_down, lora_up)
        return input_grad(grad, w, ctx.x_dtype), None, None, None


def svdquant_linear_mma(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, packed: MmaPackedWeights
) -> torch.Tensor:
    """:func:`svdquant_linear` with the weights in the CUDA GEMM layout (:func:`pack_mma_weights`).

    ``x`` ``[M, K]`` → ``[M, N]`` in ``x.dtype``; ``smooth`` ``[K]``, ``lora_down`` ``[K, r]`` canonical.
    Differentiable w.r.t. ``x`` (the weights are frozen), as ``svdquant::linear`` is.
    """
    return _MmaLinear.apply(x, smooth, lora_down, packed)
