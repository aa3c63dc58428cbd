"""Second moments ``XᵀX`` of a layer's inputs for GPTQ, summed in an order that does not depend on how the
calibration items were split between processes.

Each item (a prompt, or a process's ``run``) contributes one float32 sum (the upper triangle of ``XᵀX``, packed:
:mod:`.packed`). Floating-point
addition is not associative, so the items are added along one fixed binary tree over their indices:
the sum of an aligned block ``[j·2ᵏ, (j+1)·2ᵏ)`` is always (left half) + (right half), and what is left
after pairing every block with its sibling is added left to right. A process holds only the maximal
aligned blocks of its own items (O(log items) matrices), and merging the blocks of all processes
rebuilds the same tree, so one process and N processes give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .fixedpoint import FixedPointSum
from .packed import pack_blocks, packed_size, unpack_moment


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
        self.blocks.append((item, 1, value.cpu()))
        self.blocks = _pair_siblings(self.blocks)

    def host(self) -> PairwiseSum:
        """This sum (its blocks are on the CPU already): the interface of :class:`~.fixedpoint.FixedPointSum`."""
        return self

    def copy(self) -> PairwiseSum:
        """Another sum with the same finished blocks (their tensors are never written again: shared, not copied)."""
        return PairwiseSum(list(self.blocks))

    def same_units(self, other: MomentSum) -> bool:
        """Whether ``other`` (a new, empty sum) would add items exactly as this one does: any other tree does."""
        return isinstance(other, PairwiseSum)

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
    """``XᵀX`` of a layer's input rows ``x`` ``[M, K]``, packed (the upper triangle in row blocks: float32
    ``[packed_size(K)]``, :func:`unpack_moment` gives ``[K, K]``), on ``x``'s device: chunks of 128 rows accumulated
    in order, so the bits do not depend on the thread count (processes of a launch may differ). With ``out`` (the
    packed sum so far, on ``x``'s device) the chunks are accumulated into it, in place.

    The sum stays on ``x``'s device across calls: the recorder moves one item's sum to the CPU once, when the
    item ends, not once per call (on a GPU that would copy every hooked layer's sum per forward). Each chunk is
    added by one ``addmm_`` per row block into the sum (``C += XᵢᵀXᵢ``) rather than formed and then added: one
    pass over the sum per chunk instead of three (1.7x faster at K = 12,288 when the sums were full), and still
    the same bits on 1 and 2 threads (each matmul's reduction is the chunk's 128 rows, which no BLAS splits).

    bfloat16 / float16 rows on a GPU (:func:`tensor_core_moment`) are multiplied as they are, with float32
    output, in chunks of 8,192 rows; every other input is upcast to float32 first."""
    k = x.shape[1]
    n = packed_size(k)
    if out is not None and (out.device != x.device or out.shape != (n,) or out.dtype != torch.float32):
        raise ValueError(
            f"input_moment: the sum so far is {out.dtype} {list(out.shape)} on {out.device}, the rows "
            f"{list(x.shape)} on {x.device}: expected float32 [{n}] (K = {k}, packed) on the rows' device"
        )
    acc = out if out is not None else torch.zeros(n, device=x.device)
    blocks = pack_blocks(acc, k)
    if tensor_core_moment(x):
        for i in range(0, x.shape[0], _MOMENT_ROWS_CUDA):
            chunk = x[i : i + _MOMENT_ROWS_CUDA]
            for r0, r1, view in blocks:
                view.add_(torch.mm(chunk[:, r0:r1].t(), chunk[:, r0:], out_dtype=torch.float32))
        return acc
    x32 = x.float()
    for i in range(0, x32.shape[0], _MOMENT_ROWS):
        chunk = x32[i : i + _MOMENT_ROWS]
        for r0, r1, view in blocks:
            view.addmm_(chunk[:, r0:r1].t(), chunk[:, r0:])
    return acc


# What holds a layer's finished items: the fixed summation tree, or int64 fixed point (calibrate's hessian_sum).
MomentSum = PairwiseSum | FixedPointSum


@dataclass
class _Cell:
    """One ``XᵀX`` held for every layer of ``names``: they have all read the very same input tensors, call by call,
    since their first call, so their sums are the same bits. ``tree``: the finished items; ``item``: the item in
    progress, on the inputs' device (None until its first call)."""

    names: list[str]
    tree: MomentSum
    item: torch.Tensor | None = None


@dataclass
class _Call:
    """The last call recorded: into ``cell``, of input ``x``. ``x`` is held so that its memory cannot be freed and
    reused by another tensor that would then look the same (``key``: its storage, offset, shape, strides, dtype and
    version when recorded). ``read``: the cell's layers that have read it. ``before``: the cell's item sum before
    this call (per call: its whole sum), what a layer of the cell that does not read it keeps. ``new``: the cell was
    made by this call, so a layer never recorded before may join it."""

    cell: _Cell
    x: torch.Tensor
    key: tuple | None
    read: set[str]
    before: torch.Tensor | MomentSum | None
    new: bool


def _identity(x: torch.Tensor) -> tuple | None:
    """What must match for a later hook's input to be ``x`` unchanged; None where it cannot be told (an
    inference-mode tensor has no version counter, so an in-place change would go unseen; a tensor subclass may
    have no storage): such a call is never shared, which is always exact."""
    if x.is_inference():
        return None
    try:
        storage = x.untyped_storage().data_ptr()
        return (storage, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)
    except (RuntimeError, NotImplementedError):
        return None


class SharedMoments:
    """Each recorded layer's ``XᵀX`` per item, held once for layers that read the very same input tensor.

    Attention's ``to_q`` / ``to_k`` / ``to_v`` (and a FLUX single block's ``proj_mlp``) are called one after the
    other on one tensor: each would compute and hold the same ``K x K`` sum. A layer whose hook receives the very
    object the previous recorded call received (same storage, offset, shape, strides, dtype and ``_version``: not
    changed in place since) reads that call instead of computing it; layers that have read the same inputs since
    their first call share one :class:`_Cell`, so their sums are the same bits as if each had computed its own.

    When a layer of a cell does not read a call of the cell (another input, or no call before the next recorded
    one or the end of the item), it leaves the cell with the cell's state before that call: a copy of the item sum
    (taken before each call of a shared cell; about ``K²/2`` floats against the call's ``rows·K²`` FLOPs) and the
    finished items' tensors, which are never written again. A layer joins a cell only on the first call of both,
    and only when its own sum would add the items exactly as the cell's does (``same_units``: in fixed point the
    units come from each layer's statistics, and a layer whose inputs part later has others).

    With ``compute=False`` no sum is formed: only which layers share (:meth:`groups`), for planning the passes.
    With ``share=False`` every layer keeps its own sum (what the tests compare against). ``new_sum(name)``: the
    finished items' sum of a cell first made for layer ``name`` (default :class:`PairwiseSum`; calibrate's
    ``hessian_sum="fixed"`` gives a :class:`~.fixedpoint.FixedPointSum` sized from the layer's probe or statistics).
    A cell whose fixed-point sum has overflowed its units stops forming items: its layers are recorded again.

    With ``per_call`` (fixed point only) each call's ``XᵀX`` is added to the cell's sum at once, as an item of its
    own: no float32 sum of the item in progress is held (8 bytes per packed entry instead of 12), at the cost of one
    conversion per call instead of one per item, and a copy of the integer sum before each call of a shared cell
    (what a layer that does not read the call keeps). ``item``: the item in progress, named in errors."""

    def __init__(
        self,
        compute: bool = True,
        share: bool = True,
        new_sum: Callable[[str], MomentSum] | None = None,
        per_call: bool = False,
    ) -> None:
        self.compute = compute
        self.share = share
        self.new_sum = new_sum or (lambda _name: PairwiseSum())
        self.per_call = per_call
        self.item = 0
        self.cells: dict[str, _Cell] = {}
        self._last: _Call | None = None

    def add(self, name: str, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Record layer ``name``'s call on ``x`` (the very object its hook received), ``rows`` its ``[M, K]`` rows."""
        last, key = self._last, _identity(x) if self.share else None
        if last is not None and key is not None and x is last.x and key == last.key and name not in last.read:
            # A new layer joins only a cell made by this very call, and only if its own sum would add the items
            # exactly as the cell's does (fixed point: the same units, which come from each layer's statistics).
            if name in last.cell.names or (
                last.new and name not in self.cells and last.cell.tree.same_units(self.new_sum(name))
            ):
                if name not in last.cell.names:
                    last.cell.names.append(name)
                    self.cells[name] = last.cell
                last.read.add(name)
                return
        self._close()
        cell = self.cells.get(name)
        new = cell is None
        if new:
            cell = self.cells[name] = _Cell([name], self.new_sum(name))
        forming = self.compute and not getattr(cell.tree, "overflowed", False)
        if self.per_call:
            before = cell.tree.copy() if len(cell.names) > 1 else None
            if forming:
                cell.tree.add(self.item, input_moment(rows))
        else:
            before = cell.item.clone() if len(cell.names) > 1 and cell.item is not None else None
            if forming:
                cell.item = input_moment(rows, cell.item)
        self._last = _Call(cell, x, key, {name}, before, new)

    def _close(self) -> None:
        """The last call is over: the layers of its cell that did not read it leave with the state before it."""
        last, self._last = self._last, None
        if last is None or len(last.read) == len(last.cell.names):
            return
        left = [n for n in last.cell.names if n not in last.read]
        last.cell.names = [n for n in last.cell.names if n in last.read]
        # Together: they had the same inputs until now and none since. Per call, ``before`` is the whole sum then.
        cell = _Cell(left, last.before, None) if self.per_call else _Cell(left, last.cell.tree.copy(), last.before)
        for n in left:
            self.cells[n] = cell

    def finish_item(self, item: int) -> None:
        """File the item's sums (one per cell) as item ``item`` of each cell's sum (which keeps it on the CPU)."""
        self._close()
        for cell in {id(c): c for c in self.cells.values()}.values():
            if cell.item is not None:
                cell.tree.add(item, cell.item)
                cell.item = None

    def moments(self) -> dict[str, MomentSum]:
        """Layer name → its finished items' sums; layers that share hold the very same object."""
        return {n: c.tree for n, c in self.cells.items()}

    def take(self) -> dict[str, MomentSum]:
        """:meth:`moments` on the CPU (to be gathered between processes), letting go of them here (so whoever merges
        them can free each as it goes)."""
        self._close()
        moments, self.cells = {n: m.host() for n, m in self.moments().items()}, {}
        return moments

    def groups(self) -> list[list[str]]:
        """The layers that share a sum, each group in first-call order; groups of one layer left out."""
        return [c.names for c in {id(c): c for c in self.cells.values()}.values() if len(c.names) > 1]


def merged_packed(parts: Sequence[MomentSum], headroom: list[float] | None = None) -> torch.Tensor | None:
    """The packed float32 total (on the CPU, :mod:`.packed`) of one sum's parts from every process that holds it
    (tree or fixed point, all of one kind); None when a fixed-point sum overflowed the units of its probe
    (:attr:`~.fixedpoint.FixedPointSum.overflowed`: calibration records that layer again). A sum in a probe's units
    appends its :meth:`~.fixedpoint.FixedPointSum.headroom_bits` to ``headroom``."""
    merged = type(parts[0]).merge(list(parts))
    if getattr(merged, "overflowed", False):
        return None
    if headroom is not None and isinstance(merged, FixedPointSum) and not merged.bounded:
        headroom.append(merged.headroom_bits())
    return merged.total()


def merged_total(parts: Sequence[MomentSum], headroom: list[float] | None = None) -> torch.Tensor | None:
    """:func:`merged_packed` as the symmetric float32 ``[K, K]``."""
    packed = merged_packed(parts, headroom)
    return None if packed is None else unpack_moment(packed)


def share_labels(moments: Mapping[str, MomentSum]) -> dict[str, int]:
    """Name → a label, equal for the names that hold the very same sum object: what :func:`shared_units` needs
    from a process, small enough to gather before the sums themselves."""
    first: dict[int, int] = {}
    return {n: first.setdefault(id(v), i) for i, (n, v) in enumerate(moments.items())}


def shared_units(names: Sequence[str], labels: Sequence[Mapping[str, int]]) -> list[list[str]]:
    """``names`` (those some process has) grouped into the layers that hold one sum on every process (``labels``:
    each process's :func:`share_labels`), in ``names``' order: what is merged once for all of them. A layer a
    process never recorded adds nothing there, so layers absent from the same processes and shared on the others
    still merge to the same bits."""
    units: dict[tuple, list[str]] = {}
    for name in names:
        key = tuple(part.get(name) for part in labels)
        if any(k is not None for k in key):
            units.setdefault(key, []).append(name)
    return list(units.values())
