"""An exact, order-free sum of per-item ``XᵀX`` in int64 fixed point: one 8-byte sum per entry, where the
binary tree of :class:`~.hessian.PairwiseSum` holds ``log2(items)`` float32 partial sums.

Each item's float32 sum (packed, :mod:`.packed`) is rounded once to an integer multiple of a per-entry unit
``u_jl = 2^(s_j + s_l + o)`` and the integers are added. Integer addition is exact in any order, so how the items
were split between processes and the order parts are merged in cannot change a bit. The units come in two kinds:

* *from a probe* (:meth:`FixedPointSum.from_probe`, what calibration uses first): ``s_j = ⌈log2 ‖x_j‖⌉`` over a few
  rows every process has alike (the model's first forward), floored 8 below the layer's largest, and ``o = −27``:
  the probe's ``Σ x_j²`` sits at most at ``2^27`` units, so the sum holds ``2^35`` times the probe's energy per
  channel before its diagonal reaches ``2^62``; the rounding is at most ``2^-26`` of the probe's energy per item.
  Known before any row of the real work is seen, so ``XᵀX`` is summed in the statistics pass itself.
* *from the statistics* (:meth:`FixedPointSum.from_statistics`): ``s_j = ⌈log2 absmax_j⌉`` and ``o = ⌈log2 rows⌉
  − 61`` over every row the sum will cover: ``|Σ x_j x_l| ≤ rows · absmax_j · absmax_l ≤ 2^61 · u_jl``, so it
  cannot overflow; it needs a statistics pass first.

Overflow is seen exactly, whatever the split: the diagonal's items are never negative, so every partial diagonal
is at most the total's, and a sum is *overflowed* as soon as any partial diagonal (or one item's entry) reaches
``2^62`` units, which happens on some split exactly when it happens on all of them. Off the diagonal nothing can
wrap: Cauchy-Schwarz bounds any partial ``|Σ x_j x_l|`` by ``√(Σ x_j² · Σ x_l²)``, so by the diagonals in units
(``u_jl² = u_jj · u_ll``), below ``2^62`` plus the items' roundings. A probed sum that overflows lets go of its
integers and says so (:attr:`FixedPointSum.overflowed`): calibration records that layer again with units from the
statistics. A sum sized from the statistics that overflows had inputs that changed between passes: an error.
"""

from __future__ import annotations

import math

import torch

from .. import ops, reference
from .packed import pack_blocks, packed_size

# Every partial diagonal, and every entry of one item, must stay below 2^62 units: then no entry of any partial sum
# (bounded by the diagonals, module docstring) comes near int64's 2^63.
_LIMIT = reference.FIXED_POINT_LIMIT
# Units from the statistics: the bound rows·absmax_j·absmax_l is at most 2^61 units, half the limit (the other half
# is room for the items' float32 and integer roundings).
_FRACTION_BITS = 61
# Units from a probe: the probe's energy E_j = Σ x_j² sits at most 2^27 units (E_j <= 2^(2·s_j)): 2^35 probes' worth
# of energy fits in a channel (a FLUX.1 calibration is 2^10 denoiser calls; the tiny test pipeline's AdaLN inputs,
# one row per call, grew 2^12 beyond that from the first call), and the rounding, half a unit per item, is below
# 2^-26·E_j (2^(2·s_j) < 4·E_j), under the float32 rounding of the item itself.
_PROBE_OFFSET = -27
# A channel (nearly) silent in the probe takes the unit of one 2^8 times smaller in magnitude than the layer's
# largest: room for 2^35·2^-16 = 2^19 of the largest probe's energy in it, at a rounding of 2^-42 of that energy
# (GPTQ damps the diagonal by 1% of its mean: the small channels' precision does not matter below that).
_PROBE_FLOOR_BITS = 8


def channel_exponents(absmax: torch.Tensor) -> torch.Tensor:
    """``c_j = ⌈log2 absmax_j⌉`` as int64 ``[K]`` (0 for a channel that is zero in every row, whose entries are 0).

    Args:
        absmax: float32 ``[K]``, the per-channel max |x| over every input row the sum will cover."""
    a = absmax.double()
    mantissa, exponent = torch.frexp(a)  # a = mantissa · 2^exponent, mantissa in [0.5, 1)
    c = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact powers of two: ⌈log2 a⌉ = exponent − 1
    return torch.where(a > 0, c, torch.zeros_like(c)).long()


class FixedPointSum:
    """Per-item packed float32 sums added exactly as int64 multiples of ``2^(s_j + s_l + o)`` (module docstring).
    The same interface as :class:`~.hessian.PairwiseSum`: ``add`` per item, ``merge`` of the parts of several
    processes, ``total``; the result does not depend on the items' order or split. Made by
    :meth:`from_statistics` (cannot overflow) or :meth:`from_probe` (may: :attr:`overflowed`).

    Args:
        exponents: int64 ``[K]``, ``s_j``.
        offset: ``o``.
        bounded: the units come from statistics that bound every row (overflow is then an error, not a retry).
        name: the layer, named in errors.
    """

    def __init__(self, exponents: torch.Tensor, offset: int, *, bounded: bool, name: str = "") -> None:
        self.name = name
        self.exponents = exponents.long().cpu()
        # Exponents come from float32 magnitudes (|s_j| <= 150): far inside the kernels' bound, checked once here.
        if self.exponents.numel() and int(self.exponents.abs().max()) > ops.fixed_point.EXPONENT_LIMIT:
            raise ValueError(f"FixedPointSum({name!r}): exponents beyond ±{ops.fixed_point.EXPONENT_LIMIT}")
        self.offset = int(offset)
        self.bounded = bounded
        self._exponents_on: dict[torch.device, torch.Tensor] = {}
        self.k = exponents.numel()
        self.overflowed = False
        # On the first item's device: on a GPU the integers never cross to the host per item (one int64 K x K
        # each way would be twice the float32 item sum the summation tree copies).
        self.sum: torch.Tensor | None = None

    @classmethod
    def from_statistics(cls, absmax: torch.Tensor, rows: int, name: str = "") -> FixedPointSum:
        """Units that no input within the statistics can overflow: ``s_j = ⌈log2 absmax_j⌉``, ``o = ⌈log2 rows⌉ −
        61``.

        Args:
            absmax: float32 ``[K]``: each input channel's max |x| over every row the sum will cover.
            rows: how many rows the sum will cover in all (every item of every process), at least 1.
            name: the layer, named in errors."""
        if absmax.dim() != 1 or not torch.isfinite(absmax).all():
            raise ValueError(f"FixedPointSum({name!r}): absmax must be a finite [K] vector, got {list(absmax.shape)}")
        if rows < 1:
            raise ValueError(f"FixedPointSum({name!r}): rows must be >= 1, got {rows}")
        offset = max(0, math.ceil(math.log2(rows))) - _FRACTION_BITS
        return cls(channel_exponents(absmax), offset, bounded=True, name=name)

    @classmethod
    def from_probe(cls, energy: torch.Tensor, name: str = "") -> FixedPointSum:
        """Units sized from a probe's per-channel energy ``Σ x_j²`` (float ``[K]``, over rows every process sees
        alike): ``s_j = ⌈log2 √energy_j⌉``, at least the largest minus 8, and ``o = −27`` (module docstring). A
        layer whose probe is zero in every channel takes ``s_j = 0``."""
        if energy.dim() != 1 or not torch.isfinite(energy).all() or bool((energy < 0).any()):
            raise ValueError(
                f"FixedPointSum({name!r}): the probe's energy must be a finite, non-negative [K] vector, "
                f"got {list(energy.shape)}"
            )
        norm = energy.double().sqrt()
        s = channel_exponents(norm)
        if bool((norm > 0).any()):
            floor = s[norm > 0].max() - _PROBE_FLOOR_BITS
            s = torch.where(norm > 0, torch.clamp(s, min=floor), floor)
        return cls(s, _PROBE_OFFSET, bounded=False, name=name)

    def _exponents(self, device: torch.device) -> torch.Tensor:
        """The ``[K]`` exponents on ``device``, sent there once (not per item)."""
        s = self._exponents_on.get(device)
        if s is None:
            s = self._exponents_on[device] = self.exponents.to(device)
        return s

    def _diagonal(self, packed: torch.Tensor) -> torch.Tensor:
        """The diagonal ``[K]`` of a packed sum (a view's copy)."""
        return torch.cat([block.diagonal() for _, _, block in pack_blocks(packed, self.k)])

    def _overflow(self, item: int | str) -> None:
        """The sum reached 2^62 units: an error for units from the statistics, else let go of the integers."""
        if self.bounded:
            raise ValueError(
                f"FixedPointSum({self.name!r}): item {item}'s XᵀX exceeds rows · absmax² of the statistics it was "
                "sized from (the inputs changed between the statistics pass and this one)"
            )
        self.overflowed, self.sum = True, None

    def add(self, item: int, value: torch.Tensor) -> None:
        """Add one item's packed float32 ``XᵀX`` (``[packed_size(K)]``, :mod:`~.packed`; converted on its device,
        where the integers are kept until :meth:`host`). ``item`` is accepted for :class:`~.hessian.PairwiseSum`'s
        interface (the order does not matter here) and named in errors. A sum already overflowed ignores it."""
        k, n = self.k, packed_size(self.k)
        if value.shape != (n,):
            raise ValueError(
                f"FixedPointSum({self.name!r}): item {item} is {list(value.shape)}, expected [{n}] (K = {k}, packed)"
            )
        if ops.first_nonfinite([value]) >= 0:  # on the CPU a native scan of the bits (torch.isfinite: 5 ns per entry)
            raise ValueError(f"FixedPointSum({self.name!r}): item {item}'s XᵀX is not finite (NaN or inf inputs)")
        if self.overflowed:
            return
        if self.sum is None:
            self.sum = torch.zeros(n, dtype=torch.int64, device=value.device)
        # One kernel pass over the item and the integers (ops.fixed_point_add; on a GPU one wait per item): an
        # overflowed sum has all its entries added, and is then dropped (probe) or an error (statistics).
        if not ops.fixed_point_add(self.sum, value, self._exponents(value.device), self.offset):
            self._overflow(item)

    def headroom_bits(self) -> float:
        """How many more doublings the largest diagonal entry could take before it reached the ``2^62`` units
        that overflow: ``62 − log2(max diagonal)`` (62 for an empty sum). For units from a probe, what was left
        of the ``2^35`` times the probe's energy a channel holds."""
        if self.overflowed:
            return 0.0
        top = 0 if self.sum is None else int(self._diagonal(self.sum).max())
        return 62.0 - math.log2(top) if top > 0 else 62.0

    def host(self) -> FixedPointSum:
        """This sum with its integers on the CPU (for gathering between processes and writing), returned."""
        if self.sum is not None:
            self.sum = self.sum.cpu()
        return self

    def copy(self) -> FixedPointSum:
        """Another sum of the same items so far, added to independently from now on."""
        out = FixedPointSum(self.exponents, self.offset, bounded=self.bounded, name=self.name)
        out._exponents_on = self._exponents_on  # the same exponents: their device copies serve both
        out.overflowed = self.overflowed
        out.sum = None if self.sum is None else self.sum.clone()
        return out

    def same_units(self, other: object) -> bool:
        """Whether ``other`` (a new, empty sum) has this sum's units, so that it would turn every item into the same
        integers: what lets two layers that read the same inputs share one sum (:class:`~.hessian.SharedMoments`).
        Units come from each layer's own statistics or probe, so a layer whose inputs differ has others and keeps
        its own sum."""
        return (
            isinstance(other, FixedPointSum)
            and (self.k, self.offset, self.bounded) == (other.k, other.offset, other.bounded)
            and torch.equal(self.exponents, other.exponents)
        )

    @classmethod
    def merge(cls, parts: list[FixedPointSum]) -> FixedPointSum:
        """The sum of every part's items (parts in the same units, in any order), on the CPU; overflowed when any part
        is or the merged diagonal reaches ``2^62`` units (which no part can hide: module docstring)."""
        out = parts[0].host()
        for part in parts[1:]:
            if not out.same_units(part):
                raise ValueError(f"FixedPointSum.merge({out.name!r}): the parts were sized from different statistics")
            if out.overflowed or part.overflowed:
                out.overflowed, out.sum = True, None
            elif part.sum is not None:
                out.sum = part.sum.cpu() if out.sum is None else out.sum + part.sum.cpu()
                if not bool((out._diagonal(out.sum) < _LIMIT).all()):
                    out._overflow("(merged)")
        return out

    def total(self) -> torch.Tensor:
        """The sum, packed as the items, float32 on the CPU: the integers times their units, rounded once."""
        if self.overflowed:
            raise ValueError(f"FixedPointSum({self.name!r}) overflowed its probe's units: it has no total")
        k, total = self.k, self.host().sum
        out = torch.zeros(packed_size(k))
        if total is not None:
            for (r0, r1, ints), (_, _, block) in zip(pack_blocks(total, k), pack_blocks(out, k), strict=True):
                shift = reference.fixed_point_shift(self.exponents, self.offset, r0, r1)
                block.copy_(torch.ldexp(ints.double(), -shift).float())
        return out
