"""An exact, order-free sum of per-item ``XᵀX`` in int64 fixed point: one 8-byte sum per entry, where the
binary tree of :class:`~.hessian.PairwiseSum` holds ``log2(items)`` float32 partial sums.

Each item's float32 sum (packed, :mod:`.packed`) is rounded once to an integer multiple of a per-entry unit
``u_jl = 2^(c_j + c_l + e − 61)`` (``c_j = ⌈log2 absmax_j⌉`` of the layer's input channel ``j``, ``e = ⌈log2
rows⌉`` of every row the sum will cover, both known from a statistics pass before any ``XᵀX`` is recorded), and
the integers are added. Integer addition is exact in any order, so how the items were split between processes
and the order parts are merged in cannot change a bit. Nothing can overflow: ``|Σ x_j x_l| ≤ rows · absmax_j ·
absmax_l ≤ 2^61 · u_jl`` for the whole sum (one bit of headroom for the float32 rounding of the items), so
the integers stay below ``2^62``. The rounding error is at most ``u_jl / 2`` per item: about ``2^-59`` of
``rows · absmax_j · absmax_l``, far below the float32 rounding already in each item's sum.
"""

from __future__ import annotations

import math

import torch

from .packed import pack_blocks, packed_size

# The bound rows·absmax_j·absmax_l is at most 2^61 units: one bit below the 2^62 every item is checked against.
_FRACTION_BITS = 61


def channel_exponents(absmax: torch.Tensor) -> torch.Tensor:
    """``c_j = ⌈log2 absmax_j⌉`` as int64 ``[K]`` (0 for a channel that is zero in every row, whose entries are 0).

    Args:
        absmax: float32 ``[K]``, the per-channel max |x| over every input row the sum will cover."""
    a = absmax.double()
    mantissa, exponent = torch.frexp(a)  # a = mantissa · 2^exponent, mantissa in [0.5, 1)
    c = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact powers of two: ⌈log2 a⌉ = exponent − 1
    return torch.where(a > 0, c, torch.zeros_like(c)).long()


class FixedPointSum:
    """Per-item packed float32 sums added exactly as int64 multiples of ``2^(c_j + c_l + e − 61)`` (module
    docstring). The same interface as :class:`~.hessian.PairwiseSum`: ``add`` per item, ``merge`` of the parts
    of several processes, ``total``; the result does not depend on the items' order or split.

    Args:
        absmax: float32 ``[K]``: each input channel's max |x| over every row the sum will cover.
        rows: how many rows the sum will cover in all (every item of every process), at least 1.
        name: the layer, named in errors.
    """

    def __init__(self, absmax: torch.Tensor, rows: int, name: str = "") -> None:
        if absmax.dim() != 1 or not torch.isfinite(absmax).all():
            raise ValueError(f"FixedPointSum({name!r}): absmax must be a finite [K] vector, got {list(absmax.shape)}")
        if rows < 1:
            raise ValueError(f"FixedPointSum({name!r}): rows must be >= 1, got {rows}")
        self.name = name
        self.channel = channel_exponents(absmax)
        self.rows_exponent = max(0, math.ceil(math.log2(rows)))
        self.k = absmax.numel()
        # On the first item's device: on a GPU the integers never cross to the host per item (one int64 K x K
        # each way would be twice the float32 item sum the summation tree copies).
        self.sum: torch.Tensor | None = None

    def _shift(self, r0: int, r1: int) -> torch.Tensor:
        """``61 − c_j − c_l − e`` for rows ``[r0, r1)``, columns ``[r0, K)`` (a packed row block): value · 2^shift
        is the value in units."""
        c = self.channel
        return _FRACTION_BITS - self.rows_exponent - c[r0:r1, None] - c[None, r0:]

    def add(self, item: int, value: torch.Tensor) -> None:
        """Add one item's packed float32 ``XᵀX`` (``[packed_size(K)]``, :mod:`~.packed`; converted on its device,
        where the integers are kept until :meth:`host`). ``item`` is accepted for :class:`~.hessian.PairwiseSum`'s
        interface: the order does not matter here."""
        k, n = self.k, packed_size(self.k)
        if value.shape != (n,):
            raise ValueError(
                f"FixedPointSum({self.name!r}): item {item} is {list(value.shape)}, expected [{n}] (K = {k}, packed)"
            )
        if self.sum is None:
            self.sum = torch.zeros(n, dtype=torch.int64, device=value.device)
        limit = 2.0**62
        # One packed row block at a time: the float64 temporaries stay about K · 256 · 8 bytes.
        for (r0, r1, block), (_, _, ints) in zip(pack_blocks(value, k), pack_blocks(self.sum, k), strict=True):
            scaled = torch.ldexp(block.double(), self._shift(r0, r1).to(value.device))
            units = torch.round(scaled)  # half to even: a function of this item alone
            if not bool((units.abs() < limit).all()):  # NaN fails too
                raise ValueError(
                    f"FixedPointSum({self.name!r}): item {item}'s XᵀX exceeds rows · absmax² of the statistics it was "
                    "sized from (the inputs changed between the statistics pass and this one, or are not finite)"
                )
            ints += units.long().to(self.sum.device)

    def host(self) -> FixedPointSum:
        """This sum with its integers on the CPU (for gathering between processes and writing), returned."""
        if self.sum is not None:
            self.sum = self.sum.cpu()
        return self

    def copy(self) -> FixedPointSum:
        """Another sum of the same items so far, added to independently from now on."""
        out = FixedPointSum.__new__(FixedPointSum)
        out.name, out.channel, out.rows_exponent, out.k = self.name, self.channel, self.rows_exponent, self.k
        out.sum = None if self.sum is None else self.sum.clone()
        return out

    def same_units(self, other: object) -> bool:
        """Whether ``other`` (a new, empty sum) has this sum's units, so that it would turn every item into the same
        integers: what lets two layers that read the same inputs share one sum (:class:`~.hessian.SharedMoments`).
        Layers whose inputs part later have other statistics, so other units, and keep their own sums."""
        return (
            isinstance(other, FixedPointSum)
            and (self.k, self.rows_exponent) == (other.k, other.rows_exponent)
            and torch.equal(self.channel, other.channel)
        )

    @classmethod
    def merge(cls, parts: list[FixedPointSum]) -> FixedPointSum:
        """The sum of every part's items (parts sized from the same statistics, in any order), on the CPU."""
        out = parts[0].host()
        for part in parts[1:]:
            if part.rows_exponent != out.rows_exponent or not torch.equal(part.channel, out.channel):
                raise ValueError(f"FixedPointSum.merge({out.name!r}): the parts were sized from different statistics")
            if part.sum is not None:
                out.sum = part.sum.cpu() if out.sum is None else out.sum + part.sum.cpu()
        return out

    def total(self) -> torch.Tensor:
        """The sum, packed as the items, float32 on the CPU: the integers times their units, rounded once."""
        k, total = self.k, self.host().sum
        out = torch.zeros(packed_size(k))
        if total is not None:
            for (r0, r1, ints), (_, _, block) in zip(pack_blocks(total, k), pack_blocks(out, k), strict=True):
                block.copy_(torch.ldexp(ints.double(), -self._shift(r0, r1)).float())
        return out
