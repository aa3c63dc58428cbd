"""The canonical ops: ``svdquant::quantize_act``, ``svdquant::gemm_w4a4`` and ``svdquant::linear``.

Each op has one schema, a fake (meta) implementation so ``torch.compile(fullgraph=True)`` traces
through it, a default implementation that runs :mod:`diffusers_svdquant.reference` on any device,
and a CPU kernel from ``_C`` when the extension is built (the CUDA kernels are in :mod:`.cuda`).
They read the canonical tensors of docs/design.md §2.
"""

from __future__ import annotations

import torch

from .. import reference
from . import native


def check_quantize_act_args(x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"quantize_act: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    k = x.shape[1]
    if k % reference.GROUP_SIZE:
        raise ValueError(f"quantize_act: K={k} is not a multiple of the group size {reference.GROUP_SIZE}")
    if smooth.shape != (k,):
        raise ValueError(f"quantize_act: smooth has shape {tuple(smooth.shape)}, expected [{k}]")
    if lora_down.dim() != 2 or lora_down.shape[0] != k:
        raise ValueError(f"quantize_act: lora_down has shape {tuple(lora_down.shape)}, expected [{k}, r]")
    if x.dtype not in native.DTYPE_CODES:
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
    check_quantize_act_args(x, smooth, lora_down)
    return reference_quantize_act(x, smooth, lora_down)


def reference_quantize_act(x, smooth, lora_down):
    # The fake says the outputs are contiguous; a transposed x would make the reference's strided.
    return reference.quantize_act(x.contiguous(), smooth, lora_down)


@quantize_act.register_fake
def _(x, smooth, lora_down):
    check_quantize_act_args(x, smooth, lora_down)
    m, k = x.shape
    return (
        x.new_empty(m, k // 2, dtype=torch.uint8),
        x.new_empty(m, k // reference.GROUP_SIZE, dtype=torch.float32),
        x.new_empty(m, lora_down.shape[1], dtype=torch.float32),
    )


@quantize_act.register_kernel("cpu")
def _(x, smooth, lora_down):
    check_quantize_act_args(x, smooth, lora_down)
    if native._C is None:
        native.warn_fallback("quantize_act")
        return reference_quantize_act(x, smooth, lora_down)
    m, k = x.shape
    r = lora_down.shape[1]
    # The kernel reads all three in one dtype; float32 holds each of them exactly, so mixed inputs give
    # the reference's result (which computes in float32) rather than a rounded variant.
    x, smooth, lora_down = native.in_one_dtype(x, smooth, lora_down)
    q_x = torch.empty(m, k // 2, dtype=torch.uint8)
    s_x = torch.empty(m, k // reference.GROUP_SIZE, dtype=torch.float32)
    lora_act = torch.empty(m, r, dtype=torch.float32)
    native._C.quantize_act(
        x.data_ptr(), smooth.data_ptr(), lora_down.data_ptr(),
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(),
        m, k, r, native.DTYPE_CODES[x.dtype], reference.GROUP_SIZE, torch.get_num_threads(),
    )  # fmt: skip
    return q_x, s_x, lora_act


def check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias) -> None:
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
    check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype)


@gemm_w4a4.register_fake
def _(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype):
    check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    return q_x.new_empty(q_x.shape[0], q_w.shape[0], dtype=out_dtype)


@gemm_w4a4.register_kernel("cpu")
def _(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype):
    check_gemm_args(q_x, s_x, q_w, s_w, lora_act, lora_up, bias)
    if native._C is None:
        native.warn_fallback("gemm_w4a4")
        return reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, out_dtype)
    m, kh = q_x.shape
    n, r = q_w.shape[0], lora_act.shape[1]
    s_w, lora_up, bias = native.in_one_dtype(s_w, lora_up, bias)
    # Every temporary is bound to a name: a pointer taken from an unnamed one dangles once it is freed.
    q_x, s_x, lora_act, q_w = (
        q_x.contiguous(),
        s_x.float().contiguous(),
        lora_act.float().contiguous(),
        q_w.contiguous(),
    )
    # The kernel writes float32, bfloat16 and float16 itself (rounded once, as .to() would).
    y = torch.empty(m, n, dtype=out_dtype if out_dtype in native.DTYPE_CODES else torch.float32)
    native._C.gemm_w4a4(
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(), q_w.data_ptr(), s_w.data_ptr(),
        lora_up.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
        m, n, 2 * kh, r, native.DTYPE_CODES[s_w.dtype], native.DTYPE_CODES[y.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return y.to(out_dtype)


def _check_linear_args(x, qweight, wscales, smooth, lora_down, lora_up, bias) -> None:
    check_quantize_act_args(x, smooth, lora_down)
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
        qweight, wscales, smooth, lora_down, lora_up, bias: the canonical tensors (docs/design.md §2):
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
    if native._C is None:
        native.warn_fallback("linear")
        return reference.svdquant_linear(x.contiguous(), qweight, wscales, smooth, lora_down, lora_up, bias)
    m, k = x.shape
    n, r = qweight.shape[0], lora_down.shape[1]
    # One native call reads every float tensor in one dtype: x's when they all share it.
    xs, sm, ld, ws, lu, b = native.in_one_dtype(x, smooth, lora_down, wscales, lora_up, bias)
    qw = qweight.contiguous()  # named: see gemm_w4a4's CPU kernel
    y = torch.empty(m, n, dtype=xs.dtype)
    native._C.linear(
        xs.data_ptr(), sm.data_ptr(), ld.data_ptr(), qw.data_ptr(), ws.data_ptr(), lu.data_ptr(),
        0 if b is None else b.data_ptr(), y.data_ptr(), m, n, k, r, native.DTYPE_CODES[xs.dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    return y.to(x.dtype)  # a no-op unless x's dtype was unified away (mixed dtypes compute in float32)


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

    Args are the canonical tensors of docs/design.md §2 (``qweight`` uint8 ``[N, K/2]``, ``wscales``
    ``[N, K/64]``, ``smooth`` ``[K]``, ``lora_down`` ``[K, r]``, ``lora_up`` ``[N, r]``, ``bias`` ``[N]``).
    On CPU it is one native call (quantize_act + GEMM); elsewhere the two ops.
    """
    return torch.ops.svdquant.linear(x, qweight, wscales, smooth, lora_down, lora_up, bias)


def dequantized_w4a4(
    qweight: torch.Tensor, wscales: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor
) -> torch.Tensor:
    """Float32 ``[N, K]`` weight a W4A4 layer applies to its unsmoothed input (activation quantization aside):
    ``(deq(qweight, wscales) + lora_up @ lora_downᵀ) / smooth`` column-wise, what the input backward multiplies by.

    Args are the canonical tensors (docs/design.md §2): uint8 ``[N, K/2]``, ``[N, K/64]``, ``[K]``, ``[K, r]``,
    ``[N, r]``, any float dtype.
    """
    residual = reference.dequantize_groups(reference.unpack_int4(qweight), wscales)
    return reference.effective_weight(residual, smooth, lora_down, lora_up)


def input_grad(grad: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad`` ``[M, N]`` times the float32 effective weight ``[N, K]`` (:func:`dequantized_w4a4`), in ``dtype``."""
    return (grad.float() @ weight).to(dtype)


def _setup_linear_context(ctx, inputs, output) -> None:
    x, qweight, wscales, smooth, lora_down, lora_up, _ = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(qweight, wscales, smooth, lora_down, lora_up)


def _linear_backward(ctx, grad):
    # The gradient w.r.t. x only, straight through the activation quantization (its rounding has no useful
    # derivative), through the weight the layer computes with. The 4-bit tensors and the branch are frozen: the
    # QLoRA workflow trains adapters beside the layer. One [N, K] float32 weight lives for the call.
    grad_x = input_grad(grad, dequantized_w4a4(*ctx.saved_tensors), ctx.x_dtype)
    return grad_x, None, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_setup_linear_context)


def _no_backward(op: str):
    def backward(ctx: object, *grads: torch.Tensor) -> None:
        raise RuntimeError(
            f"svdquant::{op} has no backward: its outputs are INT4 codes or a product of them, which carry no "
            f"gradient. Gradients flow through svdquant::linear (what SVDQuantLinear calls): train through the "
            f"layer, or run under torch.no_grad() / torch.inference_mode()"
        )

    return backward


# A clear error instead of torch's "no autograd formula was registered" when a graph needs a gradient.
for _op, _name in ((quantize_act, "quantize_act"), (gemm_w4a4, "gemm_w4a4")):
    _op.register_autograd(_no_backward(_name))
