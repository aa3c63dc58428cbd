"""What each calibration pass gathers of ``XᵀX``: which layers (so the sums held at once fit a memory budget), over
which prompts, in which sums, and where the merged sums go.

The first pass runs every calibration prompt (or ``run``), each later pass the prompts ``XᵀX`` is gathered over
(:func:`spread_items`), and each gathers ``XᵀX`` for one contiguous group of layers (in module order,
:func:`plan_groups`); its sums are merged and held (:func:`merge_in_memory`) or written to disk
(:class:`ShardWriter`) before the next pass starts. A layer's sums while recording take about ``2·K²`` bytes
(packed: :func:`moment_bytes`) times :func:`tree_copies` (the partial sums of the fixed summation tree a process
holds, :mod:`.hessian`), or about ``6·K²`` in fixed point (:func:`fixed_moment_bytes`, in units from the first
forward's probe, :func:`new_sums`; a layer whose sum outgrows them is recorded again in passes of its own,
:func:`retry_groups`); layers that read the same input tensor hold one sum (:class:`~.hessian.SharedMoments`),
counted once and kept in one pass.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .fixedpoint import FixedPointSum
from .hessian import MomentSum, merged_packed, merged_total, share_labels, shared_units
from .packed import packed_size
from .processes import Processes
from .stats import HESSIAN_PREFIX, CalibrationStats
from .tensorfile import write_tensors

if TYPE_CHECKING:
    from .recorder import FirstForward

GIB = 1 << 30


def tree_copies(items: Sequence[int]) -> int:
    """The most ``K x K`` sums one layer holds at once while one process records ``items`` (increasing item
    indices): the aligned blocks finished so far plus the item in progress (:class:`~.hessian.PairwiseSum`).
    0 without items."""
    blocks: list[tuple[int, int]] = []  # (first item, size), as PairwiseSum keeps them
    most = 0
    for item in items:
        most = max(most, len(blocks) + 1)
        blocks.append((item, 1))
        while len(blocks) >= 2:
            (s0, n0), (s1, n1) = blocks[-2], blocks[-1]
            if n0 != n1 or s0 % (2 * n0) or s1 != s0 + n0:
                break
            blocks[-2:] = [(s0, 2 * n0)]
    return most


def moment_bytes(k: int, copies: int) -> int:
    """Bytes of one layer's float32 sums while recording (packed upper triangles, :mod:`.packed`: about ``2·K²``
    bytes each), ``copies`` of them (:func:`tree_copies`)."""
    return 4 * packed_size(k) * copies


def fixed_moment_bytes(k: int, per_call: bool = False) -> int:
    """Bytes of one layer's sums while recording with ``hessian_sum="fixed"``: the int64 sum and the float32 sum of
    the item in progress, both packed (:class:`~.fixedpoint.FixedPointSum`; about ``6·K²`` bytes), however many
    items a process has; ``per_call`` (each call added at once, :class:`~.hessian.SharedMoments`), the int64 sum
    alone (about ``4·K²``; the call's float32 sum is formed and converted one layer at a time)."""
    return (8 if per_call else 12) * packed_size(k)


def plan_passes(
    sizes: Sequence[tuple[str, int]],
    *,
    passes: int | None = None,
    budget_bytes: int | None = None,
    together: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Split the layers into contiguous groups, one per pass (a set of ``together`` is kept whole, where its
    first layer stands).

    Args:
        sizes: ``(layer name, bytes its sums take while recording)`` in module order.
        passes: this many groups of about equal bytes (fewer when there are fewer layers, or sets).
        budget_bytes: as few groups as keep each group's bytes within this budget (greedy, in order).
            With neither, one group (one pass).
        together: layer → the first layer of its set, for the layers that hold one sum because they read the
            same input tensor (:class:`~.hessian.SharedMoments`): a set's sum is counted once, where its first
            layer in module order stands, and the set stays in one group (in another it would not be shared).

    Returns:
        the groups, in order, each in module order; every layer in exactly one.
    """
    if passes is not None and budget_bytes is not None:
        raise ValueError("calibrate: pass hessian_passes or hessian_budget_gib, not both")
    if passes is not None and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 1):
        raise ValueError(f"calibrate: hessian_passes must be an integer >= 1, got {passes!r}")
    if budget_bytes is not None and not budget_bytes > 0:
        raise ValueError(f"calibrate: hessian_budget_gib must be > 0, got {budget_bytes / GIB!r}")
    if not sizes:
        return []
    index = {name: i for i, (name, _) in enumerate(sizes)}
    sets: dict[str, list[str]] = {}  # a set's first layer → its layers, in module order of the first
    held_by: dict[str, int] = {}
    for name, size in sizes:
        first = (together or {}).get(name, name)
        first = first if first in index else name
        sets.setdefault(first, []).append(name)
        held_by[first] = max(held_by.get(first, 0), size)  # one sum for the set (its layers have the same K)
    groups = _plan(list(held_by.items()), passes, budget_bytes)
    return [sorted((n for first in g for n in sets[first]), key=index.__getitem__) for g in groups]


def _plan(sizes: Sequence[tuple[str, int]], passes: int | None, budget_bytes: int | None) -> list[list[str]]:
    """:func:`plan_passes` on ``(name, bytes)`` units each held on its own."""
    if budget_bytes is not None:
        groups: list[list[str]] = [[]]
        held = 0
        for name, size in sizes:
            if size > budget_bytes:
                raise ValueError(
                    f"calibrate: layer {name!r} alone needs {size / GIB:.3g} GiB of XᵀX sums while recording, more "
                    f"than hessian_budget_gib={budget_bytes / GIB:.3g}; raise the budget or record it with fewer "
                    f"prompts per process"
                )
            if groups[-1] and held + size > budget_bytes:
                groups.append([])
                held = 0
            groups[-1].append(name)
            held += size
        return groups
    passes = min(passes or 1, len(sizes))
    # prefix[i]: bytes of the layers before layer i. Cut j goes where the prefix is nearest j/passes of the whole,
    # after the previous cut and leaving a layer for every later group.
    prefix = [0]
    for _, size in sizes:
        prefix.append(prefix[-1] + size)
    cuts = [0]
    for j in range(1, passes):
        lo, hi = cuts[-1] + 1, len(sizes) - (passes - j)
        target = prefix[-1] * j / passes
        i = min(max(bisect.bisect_left(prefix, target), lo), hi)
        if i > lo and abs(prefix[i - 1] - target) <= abs(prefix[i] - target):
            i -= 1
        cuts.append(i)
    cuts.append(len(sizes))
    return [[name for name, _ in sizes[a:b]] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def plan_groups(
    layers: Mapping[str, nn.Linear],
    items: list[int],
    procs: Processes,
    passes: int | None,
    budget_gib: float | None,
    shared_inputs: Callable[[], dict[str, str]],
    fixed: bool = False,
    per_call: bool = False,
) -> list[list[str]]:
    """The layers whose ``XᵀX`` each pass records (:func:`plan_passes`), the same on every rank: sized by the most
    partial sums any process holds (:func:`tree_copies` of its items) or, ``fixed``, by :func:`fixed_moment_bytes`;
    a sum that layers share (``shared_inputs()``, called only when there is more than one pass to plan) counted
    once."""
    if fixed:  # one int64 sum (and the item in progress), however the items are split
        sizes = [(name, fixed_moment_bytes(m.in_features, per_call)) for name, m in layers.items()]
    else:
        copies = max(1, *procs.gather(tree_copies(items)))
        sizes = [(name, moment_bytes(m.in_features, copies)) for name, m in layers.items()]
    budget = None if budget_gib is None else int(budget_gib * GIB)
    groups = plan_passes(sizes, passes=passes, budget_bytes=budget)  # checks the arguments before any forward
    if len(groups) <= 1:  # sharing only lowers the bytes: still one pass
        return groups
    return plan_passes(sizes, passes=passes, budget_bytes=budget, together=shared_inputs())


def spread_items(total: int, count: int | None) -> dict[int, int]:
    """The items whose ``XᵀX`` is gathered, each → its place among them (what the summation tree numbers them by:
    it pairs neighbours, and 0, 4, 8, ... would never be): ``count`` of ``range(total)`` spread evenly, item 0 among
    them (``⌊j·total / count⌋`` for ``j < count``), or every item with ``count=None`` or ``count >= total``. A
    function of the totals alone, so every split gathers the same items."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"calibrate: hessian_prompts must be an integer >= 1, got {count!r}")
    if count is None or count >= total:
        return {i: i for i in range(total)}
    return {j * total // count: j for j in range(count)}


def auto_sum(total_items: int, per_call: bool = False) -> str:
    """``hessian_sum="auto"``: int64 fixed point when it holds less than the tree while recording (its ``12`` bytes
    per packed entry, ``8`` adding each call at once, against the tree's ``4`` times its partial sums, counted as if
    one process held every item), so never more passes for a budget; else the tree, which needs no probe. Decided
    from the total item count (and where the model is) alone, so every split decides the same and gives the same
    bits."""
    return "fixed" if 4 * tree_copies(range(total_items)) > fixed_moment_bytes(1, per_call) else "tree"


def new_sums(
    units: str, probe: Callable[[], FirstForward], stats: CalibrationStats | None, index: int
) -> Callable[[str], MomentSum] | None:
    """What holds a layer's ``XᵀX`` in pass ``index``: the summation tree (``units="tree"``: None, the recorder's
    default), or int64 fixed point in units from rank 0's probe (``"probe"``) or from the statistics of pass 0
    (``"statistics"``: absmax and rows merged over every process), the same units on every rank
    (:mod:`~.fixedpoint`)."""
    if units == "tree":
        return None
    if units == "probe":
        energy = probe().energy
        return lambda name: FixedPointSum.from_probe(energy[name], name)

    def from_statistics(name: str) -> FixedPointSum:
        absmax, rows = stats.act_absmax.get(name), stats.num_tokens.get(name, 0)
        if absmax is None or rows < 1:
            raise ValueError(
                f"calibrate: layer {name} has inputs in pass {index + 1} but had none in the statistics pass: "
                "every pass must run the model on the same inputs"
            )
        return FixedPointSum.from_statistics(absmax, rows, name)

    return from_statistics


def retry_groups(
    names: Sequence[str],
    layers: Mapping[str, nn.Linear],
    runs: Sequence[tuple[list[str], str]],
    budget_gib: float | None,
    probe: Callable[[], FirstForward],
    per_call: bool = False,
) -> list[list[str]]:
    """The passes that record ``names`` again in fixed point with units from the statistics (their probe's units
    overflowed, or they had no probe), planned like the others: within ``budget_gib`` when given, else within what
    the largest planned pass held (a layer alone at least), so memory stays what the plan promised."""
    size = {n: fixed_moment_bytes(m.in_features, per_call) for n, m in layers.items()}
    together = probe().together
    if budget_gib is not None:
        budget = int(budget_gib * GIB)
    else:
        # A set's layers share one sum: counted where its first layer is, or once per group without it.
        held = [sum(size[n] for n in g if together.get(n, n) == n or together[n] not in g) for g, _ in runs]
        budget = max([*held, *(size[n] for n in names)])
    return plan_passes([(n, size[n]) for n in names], budget_bytes=budget, together=together)


@dataclass
class Merged:
    """What merging one pass's sums found.

    Attributes:
        files: layer → the shard holding its ``XᵀX`` (empty when held in memory).
        aliases: layer → the name its shared ``XᵀX`` is written under in its shard.
        overflowed: the layers whose fixed-point sums overflowed their probe's units (not kept: to be recorded
            again in units from the statistics).
        headroom: each probed fixed-point sum's :meth:`~.fixedpoint.FixedPointSum.headroom_bits`.
    """

    files: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    overflowed: list[str] = field(default_factory=list)
    headroom: list[float] = field(default_factory=list)


def merge_in_memory(moments: list[dict[str, MomentSum]], group: Sequence[str], stats: CalibrationStats) -> Merged:
    """Every process's sums of ``group`` (``moments``, in rank order) merged into ``stats.hessian``; a sum the
    layers share on every process is merged once and held once (the same tensor for each)."""
    out = Merged()
    for unit in shared_units(group, [share_labels(part) for part in moments]):
        found = [part[unit[0]] for part in moments if unit[0] in part]
        for part in moments:  # let go of the packed sums as their totals are made
            for name in unit:
                part.pop(name, None)
        total = merged_total(found, out.headroom)
        del found
        if total is None:
            out.overflowed += unit
        else:
            stats.hessian |= dict.fromkeys(unit, total)
    return out


class ShardWriter:
    """Where the passes' ``XᵀX`` go: one safetensors shard per pass in ``directory`` (default: a temporary
    folder removed with the statistics that refer to it). Rank 0 merges every process's sums and writes each
    shard; the other ranks refer to the same files (several machines need ``directory`` on a shared disk)."""

    def __init__(self, procs: Processes, directory: str | os.PathLike | None) -> None:
        self.procs = procs
        made = None
        if procs.rank == 0:
            if directory is None:
                made = tempfile.mkdtemp(prefix="svdquant-xtx-")
            else:
                os.makedirs(directory, exist_ok=True)
        self.temporary = made is not None
        self.dir = procs.gather(made or (os.fspath(directory) if directory is not None else None))[0]

    def write(self, index: int, moments: dict[str, MomentSum], group: Sequence[str]) -> Merged:
        """Merge the group's sums of every process (sum by sum, so rank 0 holds one sum's parts at a time besides
        the group's totals) and write them as shard ``index``, packed (:mod:`.packed`;
        :meth:`~.stats.CalibrationStats.hessian_for` unpacks a layer's when it is read); ``moments`` is emptied as
        it goes.

        Layers that hold one sum on every process (:func:`~.hessian.shared_units`) are merged once and written
        once, under the first one's name; the shard's metadata ``hessian_aliases`` maps the others to it.

        Returns:
            the shard of every layer written, the aliases (layer → the name it is written under), the layers whose
            fixed-point sums overflowed their probe's units (not written: to be recorded again) and the headroom.
        """
        path = os.path.join(self.dir, f"hessian-{index:05d}.safetensors")
        units = shared_units(group, self.procs.gather(share_labels(moments)))
        totals: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        overflowed: list[str] = []
        headroom: list[float] = []
        for unit in units:  # the same on every rank: one collective per sum
            part = moments.get(unit[0])
            for name in unit:
                moments.pop(name, None)
            parts = self.procs.gather_root(part)
            del part
            found = [p for p in parts or () if p is not None]
            if found:
                total = merged_packed(found, headroom)  # stored packed, as in a calibration file
                if total is None:
                    overflowed += unit
                    continue
                totals[HESSIAN_PREFIX + unit[0]] = total
                aliases |= dict.fromkeys(unit[1:], unit[0])
        written = [k[len(HESSIAN_PREFIX) :] for k in totals]
        if self.procs.rank == 0 and totals:
            shapes = {k: (torch.float32, tuple(v.shape)) for k, v in totals.items()}
            meta = {"format": "svdquant-calibration-xtx-shard"}
            if aliases:
                meta["hessian_aliases"] = json.dumps(aliases)
            write_tensors(path, shapes, totals.pop, meta)
        # Rank 0's lists, gathered after its file is complete: no rank refers to a shard before it exists.
        written, aliases, overflowed, headroom = self.procs.gather((written, aliases, overflowed, headroom))[0]
        return Merged(dict.fromkeys([*written, *aliases], path), aliases, overflowed, headroom)

    def keep_with(self, stats: CalibrationStats) -> None:
        """Keep a temporary folder as long as ``stats`` or a copy of it (which read from it) lives."""
        if self.temporary and self.procs.rank == 0:
            stats.hessian_folder = TemporaryFolder(self.dir)


class TemporaryFolder:
    """A folder removed (with what it holds) when this object is garbage-collected or the interpreter exits."""

    def __init__(self, path: str) -> None:
        self.path = path
        weakref.finalize(self, shutil.rmtree, path, True)
