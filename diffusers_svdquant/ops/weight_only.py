"""The weight-only op ``svdquant::linear_w4a16``: 16-bit activations times 4-bit weights (+ low-rank branch).

One schema, a fake (meta) implementation for ``torch.compile``, a default that runs
:func:`diffusers_svdquant.reference.linear_w4a16` on any device, and a backward with respect to the
input (the weights are frozen: the QLoRA workflow trains adapters on top), and the CPU kernel from
``_C`` when the extension is built.
"""

from __future__ import annotations

import torch

from .. import reference
from . import native


def check_linear_w4a16_args(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias) -> None:
    """Raise ``ValueError`` naming the tensor whose shape or dtype does not fit ``x`` ``[M, K]``."""
    if x.dim() != 2:
        raise ValueError(f"linear_w4a16: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in native.DTYPE_CODES:
        raise ValueError(f"linear_w4a16: x has dtype {x.dtype}; expected float32, bfloat16 or float16")
    k = x.shape[1]
    if k % reference.GROUP_SIZE:
        raise ValueError(f"linear_w4a16: K={k} is not a multiple of the group size {reference.GROUP_SIZE}")
    if qweight.dim() != 2 or qweight.shape[1] * 2 != k:
        raise ValueError(f"linear_w4a16: qweight has shape {tuple(qweight.shape)}, expected [N, {k // 2}]")
    if qweight.dtype != torch.uint8:
        raise ValueError(f"linear_w4a16: qweight must be uint8, got {qweight.dtype}")
    n, groups = qweight.shape[0], k // reference.GROUP_SIZE
    r = lora_down.shape[-1] if lora_down.dim() == 2 else -1
    for name, t, shape in (
        ("wscales", wscales, (n, groups)),
        ("wmins", wmins, (n, groups)),
        ("smooth", smooth, (k,)),
        ("lora_down", lora_down, (k, r)),
        ("lora_up", lora_up, (n, r)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"linear_w4a16: {name} has shape {tuple(t.shape)}, expected {list(shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"linear_w4a16: bias has shape {tuple(bias.shape)}, expected [{n}]")


@torch.library.custom_op("svdquant::linear_w4a16", mutates_args=())
def linear_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wmins: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """A weight-only INT4 linear (``reference.linear_w4a16``): ``[M, K]`` → ``[M, N]`` in ``x.dtype``.

    Args:
        x: ``[M, K]`` float32 / bfloat16 / float16.
        qweight: uint8 ``[N, K/2]`` unsigned codes; wscales, wmins: ``[N, K/64]``; smooth: ``[K]``;
            lora_down: ``[K, r]``; lora_up: ``[N, r]``; bias: ``[N]`` or None (docs/design.md §2).
    """
    check_linear_w4a16_args(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    return reference.linear_w4a16(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)


@linear_w4a16.register_fake
def _(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias):
    check_linear_w4a16_args(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    return x.new_empty(x.shape[0], qweight.shape[0])


def dequantized_w4a16(qweight, wscales, wmins, smooth, lora_down, lora_up) -> torch.Tensor:
    """Float32 ``[N, K]`` effective weight of a W4A16 layer on the unsmoothed input:
    ``(W + lora_up @ lora_downᵀ) / smooth`` column-wise (what the backward multiplies by)."""
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qweight), wscales, wmins)
    if lora_down.shape[-1]:
        w = w.addmm_(lora_up.float(), lora_down.float().t())
    return w.div_(smooth.float().unsqueeze(0))


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, wscales, wmins, smooth, lora_down, lora_up, _ = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(qweight, wscales, wmins, smooth, lora_down, lora_up)


def _backward(ctx, grad):
    # dy/dx only: the 4-bit tensors are frozen. Computed in float32 from the dequantized weight.
    w = dequantized_w4a16(*ctx.saved_tensors)
    grad_x = (grad.float() @ w).to(ctx.x_dtype)
    return grad_x, None, None, None, None, None, None, None


linear_w4a16.register_autograd(_backward, setup_context=_setup_context)
