"""Second moments ``XᵀX`` of a layer's inputs for GPTQ, summed in an order that does not depend on how the
calibration items were split between processes.

Each item (a prompt, or a process's ``run``) contributes one ``[K, K]`` float32 sum. Floating-point
addition is not associative, so the items are added along one fixed binary tree over their indices:
the sum of an aligned block ``[j·2ᵏ, (j+1)·2ᵏ)`` is always (left half) + (right half), and what is left
after pairing every block with its sibling is added left to right. A process holds only the maximal
aligned blocks of its own items (O(log items) matrices), and merging the blocks of all processes
rebuilds the same tree, so one process and N processes give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PairwiseSum:
    """Partial sums of per-item tensors along the fixed tree: ``blocks`` are ``(first item, items, sum)``
    in item order, each an aligned block (its size a power of two dividing its first item)."""

    blocks: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)

    def add(self, item: int, value: torch.Tensor) -> None:
        """Add item ``item``'s tensor; items must arrive in increasing order within one process."""
        if self.blocks and item < self.blocks[-1][0] + self.blocks[-1][1]:
            raise ValueError(
                f"PairwiseSum: item {item} arrives after items up to {self.blocks[-1][0] + self.blocks[-1][1] - 1}"
            )
        self.blocks.append((item, 1, value))
        self.blocks = _pair_siblings(self.blocks)

    @classmethod
    def merge(cls, parts: list[PairwiseSum]) -> PairwiseSum:
        """The sum over the items of every part (parts hold disjoint items, in any order)."""
        blocks = sorted((b for p in parts for b in p.blocks), key=lambda b: b[0])
        return cls(_pair_siblings(blocks))

    def total(self) -> torch.Tensor | None:
        """The sum of every item, or None without any."""
        if not self.blocks:
            return None
        out = self.blocks[0][2]
        for _, _, value in self.blocks[1:]:
            out = out + value
        return out


def _pair_siblings(blocks: list[tuple[int, int, torch.Tensor]]) -> list[tuple[int, int, torch.Tensor]]:
    """Replace adjacent sibling blocks by their sum (left + right) until no two are siblings."""
    out: list[tuple[int, int, torch.Tensor]] = []
    for block in blocks:
        out.append(block)
        while len(out) >= 2:
            (s0, n0, v0), (s1, n1, v1) = out[-2], out[-1]
            if n0 != n1 or s0 % (2 * n0) or s1 != s0 + n0:
                break
            out[-2:] = [(s0, 2 * n0, v0 + v1)]
    return out


# Rows per matmul: a BLAS may split a long reduction between threads, which changes the rounding with the
# thread count (measured: 1,000+ rows differ between 1 and 2 threads); short ones it does not split.
_MOMENT_ROWS = 128
# On a GPU the bits do not depend on a thread count (cuBLAS gives the same bits on the same GPU model for the
# same shapes), so a call's rows go in long chunks: a 128-row chunk there would cost three passes over the
# K x K sum for 2·128·K² flops, which is memory-bound on any tensor-core GPU.
_MOMENT_ROWS_CUDA = 8192


def tensor_core_moment(x: torch.Tensor) -> bool:
    """Whether :func:`input_moment` forms ``x``'s ``XᵀX`` from its 16-bit values on tensor cores: CUDA rows in
    bfloat16 or float16. Their products are exact in float32 (8 or 11 significant bits each), so this is the
    same sum as upcasting first, but at the GPU's 16-bit matmul rate instead of its float32 one (about ten
    times the float32 rate on an A100 / H100 / H200); only the tensor cores' float32 accumulation order differs."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def input_moment(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``XᵀX`` ``[K, K]`` in float32, on ``x``'s device, of a layer's input rows ``x`` ``[M, K]``: chunks of 128
    rows accumulated in order, so the bits do not depend on the thread count (processes of a launch may differ).
    With ``out`` (a float32 ``[K, K]`` sum so far on ``x``'s device) the chunks are accumulated into it, in place.

    The sum stays on ``x``'s device across calls: the recorder moves one item's sum to the CPU once, when the
    item ends, not once per call (on a GPU that would copy every hooked layer's ``K x K`` per forward: ~69 GiB
    per denoiser call on FLUX.1). Each chunk is added by one ``addmm_`` into the sum (``C += XᵢᵀXᵢ``) rather than
    formed and then added: one pass over the ``K x K`` sum per chunk instead of three, 1.7x faster at K = 12,288
    (1,280 rows, 2 threads: 2.76 s -> 1.57 s), and still the same bits on 1 and 2 threads.

    bfloat16 / float16 rows on a GPU (:func:`tensor_core_moment`) are multiplied as they are, with float32
    output, in chunks of 8,192 rows; every other input is upcast to float32 first."""
    k = x.shape[1]
    if out is not None and (out.device != x.device or out.shape != (k, k) or out.dtype != torch.float32):
        raise ValueError(
            f"input_moment: the sum so far is {out.dtype} {list(out.shape)} on {out.device}, the rows "
            f"{list(x.shape)} on {x.device}: expected float32 [{k}, {k}] on the rows' device"
        )
    acc = out if out is not None else torch.zeros(k, k, device=x.device)
    if tensor_core_moment(x):
        for i in range(0, x.shape[0], _MOMENT_ROWS_CUDA):
            chunk = x[i : i + _MOMENT_ROWS_CUDA]
            acc.add_(torch.mm(chunk.t(), chunk, out_dtype=torch.float32))
        return acc
    x32 = x.float()
    for i in range(0, x32.shape[0], _MOMENT_ROWS):
        chunk = x32[i : i + _MOMENT_ROWS]
        acc.addmm_(chunk.t(), chunk)
    return acc
