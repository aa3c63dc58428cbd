"""The packed layout of the ``XᵀX`` sums of calibration (:func:`~.hessian.input_moment`): the upper triangle
of the symmetric ``K x K`` matrix in row blocks, one after another in one flat vector. The layout itself (its
blocks, size and block views) is :mod:`diffusers_svdquant.reference`'s, which the fixed-point kernels share."""

from __future__ import annotations

import torch

from ..reference import pack_blocks, packed_row_blocks, packed_size

# XᵀX is symmetric: the sums hold its upper triangle only, in row blocks of reference.PACK_ROWS (256) rows (block:
# rows [r0, r1), columns [r0, K), row-major, one after another in a flat float32 vector; the layout the fixed-point
# kernels read). Half the memory of K x K (0.51 of it at K = 12,288; the diagonal blocks' lower wedges are the rest)
# and half the matmul FLOPs (1.6x faster here at K = 3,072 and 12,288): the pass plan of a FLUX-sized model needs
# half the passes.


def packed_width(n: int) -> int:
    """The ``K`` whose packed ``XᵀX`` has ``n`` entries (ValueError when none has)."""
    lo, hi = 0, 1
    while packed_size(hi) < n:
        hi *= 2
    while lo < hi:  # packed_size grows with K: the smallest K with packed_size(K) >= n
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if packed_size(mid) < n else (lo, mid)
    if packed_size(lo) != n:
        raise ValueError(f"{n} entries are no packed XᵀX (K = {lo} has {packed_size(lo)})")
    return lo


def unpack_moment(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric float32 ``[K, K]`` (on the CPU) of a packed ``XᵀX``: each entry from the upper triangle,
    mirrored below the diagonal (the diagonal blocks' computed lower wedges are not used)."""
    k = packed_width(packed.numel())
    out = torch.empty(k, k)
    for r0, r1, view in pack_blocks(packed.float().cpu(), k):
        out[r0:r1, r0:] = view
        wedge = out[r0:r1, r0:r1]
        wedge.copy_(torch.triu(wedge) + torch.triu(wedge, 1).t())
        out[r1:, r0:r1] = out[r0:r1, r1:].t()
    return out


def pack_moment(full: torch.Tensor) -> torch.Tensor:
    """The packed upper triangle (float32 ``[packed_size(K)]``) of a symmetric ``[K, K]`` ``XᵀX``: what
    :func:`unpack_moment` turns back into the same matrix, bit for bit."""
    k = full.shape[0]
    if full.dim() != 2 or full.shape[1] != k:
        raise ValueError(f"pack_moment: XᵀX must be square [K, K], got {list(full.shape)}")
    return torch.cat([full[r0:r1, r0:].float().reshape(-1) for r0, r1, _ in packed_row_blocks(k)])
