"""The CPU GEMM's weight tile layout (``cpp/cpu/gemm_layout.h``) as plain torch: the spec the native
packing is tested against. Test-only: the kernels build the tiles themselves from the canonical
tensors on every call, and nothing in the package reads this layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffusers_svdquant import reference
from diffusers_svdquant.ops import native
from diffusers_svdquant.ops.native import DTYPE_CODES, in_one_dtype


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
    if native._C is None:
        raise RuntimeError(f"diffusers_svdquant._C is not available: {native.native_error()}")
    n, kh = qweight.shape
    g, r, t = 2 * kh // reference.GROUP_SIZE, lora_up.shape[1], math.ceil(n / _TILE_N)
    ws, lu, b = in_one_dtype(wscales, lora_up, bias)
    qw = qweight.contiguous()
    wp = torch.empty(t, g * _TILE_BYTES, dtype=torch.uint8)
    fl = torch.empty(t, g + r + 1, _TILE_N, dtype=torch.float32)
    native._C.pack_gemm_tiles(
        qw.data_ptr(), ws.data_ptr(), lu.data_ptr(), 0 if b is None else b.data_ptr(),
        wp.data_ptr(), fl.data_ptr(), n, 2 * kh, r, DTYPE_CODES[ws.dtype],
    )  # fmt: skip
    wq = wp[:, : g * 1024].contiguous().view(torch.int8).view(t, g, 1024)
    wsum = wp[:, g * 1024 :].contiguous().view(torch.int16).view(t, g, _TILE_N)
    return PackedGemmWeights(wq, wsum, fl[:, :g].contiguous(), fl[:, g : g + r].contiguous(), fl[:, -1].reshape(-1), n)
