"""The weight-only op ``svdquant::linear_w4a16``: 16-bit activations times 4-bit weights (+ low-rank branch).

One schema, a fake (meta) implementation for ``torch.compile``, a default that runs
:func:`diffusers_svdquant.reference.linear_w4a16` on any device, and a backward with respect to the
input (the weights are frozen: the QLoRA workflow trains adapters on top), and the CPU kernel from
``_C`` when the extension is built.

The CPU kernel runs a call in one of five ways (docs/design.md §4, "W4A16 on CPU"); :func:`cpu_regime` names the
one a call takes:

* ``"gemv"``: few rows (:data:`GEMV_MAX_ROWS`), one native call streams the 4-bit weights once and
  computes in float32 (``_C.linear_w4a16``): the reference's arithmetic up to summation order;
* ``"gemv_bf16"``: the same rows of a bfloat16 ``x`` on every x86 CPU path but ``generic``: one native call
  (``_C.linear_w4a16(..., bf16=True)``) with x̂ in 16-bit fixed point per group of 64
  (:func:`~diffusers_svdquant.reference.quantize_fixed16`) and integer products against the exact weights
  (``vpdpbusd``, or ``vpmaddubsw`` on ``avx2``; finer than a bfloat16 ``nn.Linear``'s rounding of x̂, weights not
  rounded); when the other float tensors are not all bfloat16 the call computes in float32 as ``"gemv"`` does;
* ``"gemm_bf16"``: a bfloat16 ``x`` of more rows than :data:`GEMM_BF16_AFTER_ROWS` where torch's bfloat16 GEMM is
  emulated (:func:`bf16_in_hardware` false), on the ``avxvnni`` and AVX-512 paths: one native call
  (``_C.linear_w4a16(..., gemm=True)``) in the GEMV's fixed point, register-blocked over rows (``vpdpbusd`` with
  the columns in the lanes; twice a float32 FMA's products per instruction), with the GEMV's numerics;
* ``"tiles"``: a bfloat16 ``x`` of more rows than :data:`TILES_AFTER_ROWS` gives the CPU path, on the ``amx``
  path (AMX-BF16 tiles) and the ``avx512bf16`` path (zmm ``vdpbf16ps``), one native call
  (``_C.linear_w4a16(..., tiles=True)``) that decodes the 4-bit weights into bfloat16 tiles on the fly; x̂, W,
  lora_act and lora_up are rounded to bfloat16 (the precision of a bfloat16 ``nn.Linear``), products and sums in
  float32;
* ``"panels"``: more rows elsewhere (compute-bound): the weight is dequantized natively in panels of columns
  (``_C.dequantize_w4a16``) that ``torch.mm`` multiplies with x̂ (:func:`panel_dtype`). A bfloat16 ``x``
  gets bfloat16 panels and x̂ rounded to bfloat16 (torch's AMX / AVX-512 BF16 kernels) where the CPU has
  bfloat16 in hardware (:func:`bf16_in_hardware`), float32 panels and x̂ elsewhere (torch's bfloat16 GEMM is
  emulated there, its float32 one the fastest); float32 and float16 inputs always float32 (their precision: the
  tiles would round them to bfloat16).
"""

from __future__ import annotations

import os

import torch

from .. import reference
from . import native

# Rows up to which the native float32 kernel is faster than dequantized panels + torch.mm, per input dtype
# (measured on an AMX Xeon, benchmarks/bench_w4a16_cpu.py: bfloat16 panels ride torch's AMX kernels,
# float32 ones its much slower float32 GEMM). bfloat16, with the codes prefetched: native 6.2 / 7.2 / 10.1 ms
# vs panels 8.2 / 8.1 / 8.3 ms at 8 / 12 / 16 rows of 3072 -> 18432 (12288 -> 3072: 4.1 / 5.1 / 7.5 vs 6.1 /
# 6.2 / 6.7).
GEMV_MAX_ROWS = {torch.bfloat16: 12, torch.float16: 16, torch.float32: 16}
# Rows up to which a bfloat16 x keeps the fixed-point GEMV (gemv_bf16) where torch's bfloat16 GEMM is emulated and
# the panels are float32 (bf16_in_hardware() false), on the avx2 path (the others have the fixed-point GEMM).
# Measured on Zen 5 with torch capped at AVX2, GEMV vs float32 panels in ms: avxvnni at 32 / 48 / 64 rows of
# 3072 -> 18432 34.3 / 40.5 / 51.1 vs 36.5 / 44.7 / 49.1 (3072 -> 12288 13.3 / 23.2 / 53.5 vs 20.6 / 31.1 / 59.4);
# avx2 (vpmaddubsw) 28.2 / 45.4 / 68.7 vs 30.0 / 44.5 / 49.8.
GEMV_BF16_EMULATED_MAX_ROWS = 32
# Rows above which a bfloat16 x takes the fixed-point GEMM (gemm_bf16) instead of the fixed-point GEMV where
# torch's bfloat16 GEMM is emulated. Measured on Zen 5 with oneDNN capped, same process, GEMV / GEMM in ms
# (3072 -> 18432, 3072 -> 12288, 12288 -> 3072): avxvnni (ymm) at 8 rows 5.93 / 6.20, 2.78 / 3.50, 4.14 / 3.85; at
# 12 rows 6.49 / 6.26, 4.88 / 4.41, 4.58 / 3.87; at 16 rows 9.08 / 7.30, 5.98 / 4.46, 7.30 / 5.15. avx512vnni (zmm)
# at 8 rows 3.07 / 4.54, 1.90 / 2.50, 2.91 / 3.48; at 16 rows 8.92 / 5.02, 5.99 / 4.43, 5.04 / 5.09.
GEMM_BF16_AFTER_ROWS = 12
# Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16, AMX-BF16): None until first asked. Without it
# torch's bfloat16 GEMM is emulated, and bfloat16 panels through it measured 10-100x slower than torch's float32
# GEMM on Zen 5 with oneDNN capped at AVX2 (3072 -> 18432: 484 ms vs 26 ms at 16 rows, 18.1 s vs 0.18 s at 256):
# there a bfloat16 x gets float32 panels, as float32 and float16 do.
_bf16_in_hardware: bool | None = None
# Rows above which a bfloat16 x runs the tile kernel, per CPU path that has one. AMX: the tiles cost the same from 1
# to 16 rows (decoding); the fixed-point GEMV about 0.5 ms per row on 3072 -> 18432 once compute-bound. Measured on
# the AMX Xeon, same process, GEMV vs tiles in ms at 4 / 6 rows: 3072 -> 18432 2.19 / 3.11 vs 2.75 / 2.79;
# 3072 -> 12288 1.46 / 2.19 vs 1.87 / 1.89; 12288 -> 3072 1.45 / 2.15 vs 1.72 / 1.70; at 5 rows (a register block
# of 4 and one of 1) 2.87 / 2.00 / 1.97 vs 2.79 / 1.88 / 1.71. avx512bf16 (zmm vdpbf16ps, half AMX's rate): on
# Zen 5, GEMV vs tiles in ms at 8 / 10 rows: 3.93 / 5.43 vs 5.02 / 5.03; 2.57 / 3.21 vs 3.33 / 2.92; 2.03 / 2.57
# vs 2.58 / 2.56.
TILES_AFTER_ROWS = {"amx": 4, "avx512bf16": 8}
# Bytes per dequantized panel: few enough round trips between _C and torch's matmul, small enough to stay
# in cache between the two (measured best of 1.5, 8, 32 MiB and whole layers on the AMX Xeon).
PANEL_BYTES = 8 << 20


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
    residual = reference.dequantize_groups_affine(reference.unpack_uint4(qweight), wscales, wmins)
    return reference.effective_weight(residual, smooth, lora_down, lora_up)


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) under which its bfloat16 GEMM is emulated even on bfloat16 hardware.
_ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def bf16_in_hardware() -> bool:
    """Whether torch's bfloat16 GEMM runs on bfloat16 dot products, so that it is torch's fastest one: the CPU has
    AVX512-BF16 (hence the ``avx512bf16`` path) or AMX-BF16, per ``_C``'s CPU detection (whatever path is
    selected), and ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) does not cap oneDNN below them. Read once."""
    global _bf16_in_hardware
    if _bf16_in_hardware is None:
        cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
        hardware = bool({"avx512bf16", "amx"} & set(native.supported_cpu_isas()))
        _bf16_in_hardware = hardware and cap not in _ONEDNN_CAPS_WITHOUT_BF16
    return _bf16_in_hardware


def panel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the dequantized panels (and of x̂) for an input of ``dtype``: bfloat16 for a bfloat16 input on a
    CPU with bfloat16 in hardware (the precision of a bfloat16 ``nn.Linear``), float32 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 and bf16_in_hardware() else torch.float32


def _gemv_max_rows(dtype: torch.dtype) -> int:
    """Rows up to which ``dtype`` takes a GEMV rather than the panels (GEMV_MAX_ROWS, GEMV_BF16_EMULATED_MAX_ROWS)."""
    if dtype != torch.bfloat16 or bf16_in_hardware():
        return GEMV_MAX_ROWS[dtype]
    if native._C.w4a16_bf16_gemv_available():
        return GEMV_BF16_EMULATED_MAX_ROWS
    return GEMV_MAX_ROWS[torch.float32]  # the float32 GEMV against float32 panels


def cpu_regime(m: int, dtype: torch.dtype) -> str:
    """How the CPU kernel runs ``m`` rows of ``dtype`` on the selected CPU path: ``"gemv"``, ``"gemv_bf16"``,
    ``"gemm_bf16"``, ``"tiles"`` or ``"panels"`` (module docstring), ``"reference"`` without ``_C``."""
    if native._C is None:
        return "reference"
    if (
        dtype == torch.bfloat16
        and m > min(TILES_AFTER_ROWS.values())
        and native._C.w4a16_tiles_available()
        and m > TILES_AFTER_ROWS[native._C.cpu_isa()]
    ):
        return "tiles"
    if (
        dtype == torch.bfloat16
        and m > GEMM_BF16_AFTER_ROWS
        and native._C.w4a16_bf16_gemm_available()
        and not bf16_in_hardware()
    ):
        return "gemm_bf16"
    if m > _gemv_max_rows(dtype):
        return "panels"
    if dtype == torch.bfloat16 and native._C.w4a16_bf16_gemv_available():
        return "gemv_bf16"
    return "gemv"


def eager_on_cpu(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may take :func:`linear_w4a16_cpu` directly instead of the op: a plain CPU tensor,
    outside ``torch.compile``, with no gradient to record."""
    return (
        type(x) is torch.Tensor
        and x.is_cpu  # not x.device.type: that builds a device object, a cost measured here
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    )


def linear_w4a16_cpu(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias) -> torch.Tensor:
    """The CPU implementation of ``svdquant::linear_w4a16`` (its registered CPU kernel; arguments and result as
    :func:`linear_w4a16`'s, CPU tensors).

    ``W4A16Linear`` calls it directly where :func:`eager_on_cpu` holds: the op's dispatch from Python, and every
    Python-level torch call, costs tens of microseconds each when a large layer before it has flushed the caches
    (measured on the AMX Xeon after a 75 MB ``F.linear``: about 0.2 ms for the dispatch alone, as much as a
    fifth of an M = 1 call), so this path makes as few of them as it can.
    """
    check_linear_w4a16_args(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    regime = cpu_regime(x.shape[0], x.dtype)
    if regime == "reference":
        native.warn_fallback("linear_w4a16")
        return reference.linear_w4a16(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    if regime == "panels":
        return _linear_w4a16_panels(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    m, k = x.shape
    n, r = qweight.shape[0], lora_down.shape[1]
    # One native call reads every float tensor in one dtype: x's when they all share it (else float32,
    # which holds each of them exactly).
    xs, sm, ld, ws, wm, lu, b = native.in_one_dtype(x, smooth, lora_down, wscales, wmins, lora_up, bias)
    if regime == "gemm_bf16" and xs.dtype != torch.bfloat16:  # float tensors of mixed dtypes: many float32 rows
        return _linear_w4a16_panels(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    qw = qweight.contiguous()  # named: a pointer taken from an unnamed temporary dangles once it is freed
    y = torch.empty(m, n, dtype=xs.dtype)
    native._C.linear_w4a16(
        xs.data_ptr(), sm.data_ptr(), ld.data_ptr(), qw.data_ptr(), ws.data_ptr(), wm.data_ptr(), lu.data_ptr(),
        0 if b is None else b.data_ptr(), y.data_ptr(), m, n, k, r, native.DTYPE_CODES[xs.dtype],
        torch.get_num_threads(), tiles=regime == "tiles", bf16=regime == "gemv_bf16" and xs.dtype == torch.bfloat16,
        gemm=regime == "gemm_bf16",
    )  # fmt: skip
    return y if y.dtype == x.dtype else y.to(x.dtype)


linear_w4a16.register_kernel("cpu")(linear_w4a16_cpu)


def _linear_w4a16_panels(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias) -> torch.Tensor:
    """Many rows: ``yᵀ`` panel by panel, ``[W_panel | lora_up_panel] @ [x̂ᵀ ; lora_actᵀ] + bias`` in one
    ``torch.addmm`` each, W_panel dequantized natively into the same buffer. The panel is the row operand:
    measured faster than ``x̂ @ panelᵀ``, whose weight operand torch repacks per call."""
    m, k = x.shape
    n, r = qweight.shape[0], lora_down.shape[1]
    dtype = panel_dtype(x.dtype)
    xh = x.float() / smooth.float()
    rhs = torch.empty(k + r, m, dtype=dtype)  # [x̂ᵀ ; lora_actᵀ]
    rhs[:k] = xh.t()
    if r:
        rhs[k:] = (xh @ lora_down.float()).t()
    ws, wm = native.in_one_dtype(wscales, wmins)
    qw = qweight.contiguous()
    cols = min(n, max(16, PANEL_BYTES // ((k + r) * dtype.itemsize) // 16 * 16))
    panel = torch.empty(cols, k + r, dtype=dtype)
    yt = torch.empty(cols, m, dtype=dtype)  # a panel's yᵀ, copied into y while it is in cache
    y = torch.empty(m, n, dtype=x.dtype)
    zeros = torch.zeros(cols, 1, dtype=dtype)
    for n0 in range(0, n, cols):
        n1 = min(n, n0 + cols)
        p = panel[: n1 - n0]
        native._C.dequantize_w4a16(
            qw[n0:n1].data_ptr(), ws[n0:n1].data_ptr(), wm[n0:n1].data_ptr(), 0, p.data_ptr(), n1 - n0, k, k + r,
            native.DTYPE_CODES[ws.dtype], native.DTYPE_CODES[dtype], torch.get_num_threads(),
        )  # fmt: skip
        p[:, k:] = lora_up[n0:n1]
        out = yt[: n1 - n0]
        # addmm even without a bias: torch 2.13's plain bfloat16 mm of these shapes takes a path 30x slower
        # on 2 threads (measured), its addmm does not.
        torch.addmm(zeros[: n1 - n0] if bias is None else bias[n0:n1].to(dtype).unsqueeze(1), p, rhs, out=out)
        y[:, n0:n1] = out.t()
    return y


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
