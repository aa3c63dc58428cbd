"""The forward pre-hooks of calibration: what one run over the calibration inputs records per target linear
(absmax, token counts, bottom-k row samples, ``XᵀX``), and the probe of the model's first forward that sizes the
fixed-point units and finds the layers that read one input tensor before any pass."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hessian import MomentSum, SharedMoments
from .processes import Processes
from .stats import CalibrationStats, keep_bottom_k

# Layers that read the very same input tensor hold one XᵀX (hessian.SharedMoments); False gives each its own (the
# tests compare the two).
SHARE_INPUTS = True
# Fixed-point sums add each call at once (hessian.SharedMoments(per_call=True): 8 bytes per packed entry instead of
# 12) when the calibrated model is on a GPU, where converting a call costs little (unless a hessian_budget_gib
# holds the 12 bytes in as few passes: calibrate); None: decided so, True / False: always / never (the tests run
# it on the CPU).
FIXED_PER_CALL: bool | None = None


# calibrate's hessian_rows_per_column="auto" with a pipeline: XᵀX from enough of each layer's calls for about this
# many rows per input column, where the calls offer more. Measured (benchmarks/bench_xtx_rows.py: a 3072 -> 3072
# layer whose rows share their prompt and step, 171 rows per column offered): at 64 the held-out W4A4 output error
# is 1.0005x every call's (round to nearest: 1.549x), the weight error alone 1.026x; FLUX.1 at 128 prompts x 8
# steps offers its wide layers 300-1,500, so they keep about a fifth of their calls.
DEFAULT_ROWS_PER_COLUMN = 64


def call_fraction(rows_per_column: int | None, k: int, rows: int, calls: int) -> float:
    """The share of a layer's calls whose rows go into its ``XᵀX``, for about ``rows_per_column`` rows per input
    column when it sees ``calls`` calls of ``rows`` rows each and has ``k`` input columns: 1 (every call) when
    the calls offer no more than that, or with ``rows_per_column=None``."""
    if rows_per_column is None or rows * calls <= rows_per_column * k:
        return 1.0
    return rows_per_column * k / (rows * calls)


def keeps_call(seed: int, k: int, rows: int, item: int, call: int, fraction: float) -> bool:
    """Whether call ``call`` of item ``item`` goes into the ``XᵀX`` of a layer with ``k`` input columns and ``rows``
    rows per call: a pseudo-random draw with probability ``fraction``, a function of these numbers alone, so every
    process split keeps the same calls, and layers that read one tensor (the same ``k``, rows and call) keep the
    same ones, so they still share one sum. Random, not every n-th call: a stride that is a multiple of the step
    count would keep one denoising step alone. The first call of item 0 (always an ``XᵀX`` item) is always kept,
    so no sum is left empty (a share under one call per layer means one call offers the rows asked for)."""
    if fraction >= 1.0 or (item == 0 and call == 0):
        return True
    key = hashlib.blake2b(f"{seed}/{k}/{rows}/{item}/{call}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") < fraction * 2.0**64


def per_call_forced() -> bool:
    """Whether :data:`FIXED_PER_CALL` forces the mode (else calibrate may add per prompt on a GPU when a budget
    allows it)."""
    return FIXED_PER_CALL is not None


def fixed_per_call(model: nn.Module) -> bool:
    """Whether fixed-point sums of ``model``'s calibration add each call at once (:data:`FIXED_PER_CALL`)."""
    if FIXED_PER_CALL is not None:
        return FIXED_PER_CALL
    return any(p.is_cuda for p in model.parameters())


class Recorder:
    """Forward pre-hooks that fill a :class:`CalibrationStats` (absmax, token counts, row samples; with
    ``record_stats``), each layer of ``hessian_layers``'s ``XᵀX`` per item (:class:`~.hessian.SharedMoments`;
    with ``compute_hessian=False`` only which layers share one), and with ``probe`` each layer's per-channel energy
    ``Σ x_j²`` (float64 ``[K]`` on the CPU, :attr:`energy`). ``places``: the items whose ``XᵀX`` is recorded, each →
    its place among them, what the summation tree numbers it by (:func:`~.passes.spread_items`; default every item,
    by its own index). ``per_call``: fixed-point sums add each call at once (:class:`~.hessian.SharedMoments`).
    ``rows_per_column`` / ``xtx_calls``: each ``XᵀX`` sums the calls :func:`keeps_call` keeps, for about that many
    rows per input column over the ``xtx_calls`` calls a layer is expected to see (:func:`call_fraction`; None:
    every call). :attr:`hessian_rows`: layer → the rows its ``XᵀX`` summed."""

    def __init__(
        self,
        max_samples: int,
        seed: int,
        hessian_layers: Collection[str] = (),
        record_stats: bool = True,
        compute_hessian: bool = True,
        new_sum: Callable[[str], MomentSum] | None = None,
        probe: bool = False,
        places: Mapping[int, int] | None = None,
        per_call: bool = False,
        rows_per_column: int | None = None,
        xtx_calls: int = 1,
    ) -> None:
        self.stats = CalibrationStats()
        self.max_samples = max_samples
        self.seed = seed
        self.item = 0  # index of the prompt (or run) being processed: part of every row's key
        self._calls: dict[str, int] = {}
        self.hessian_layers = frozenset(hessian_layers)
        self.record_stats = record_stats
        self.sums = SharedMoments(compute=compute_hessian, share=SHARE_INPUTS, new_sum=new_sum, per_call=per_call)
        self.energy: dict[str, torch.Tensor] | None = {} if probe else None
        self.places = places
        self.rows_per_column = rows_per_column
        self.xtx_calls = xtx_calls
        self.hessian_rows: dict[str, int] = {}

    def start_item(self, item: int) -> None:
        self.finish_item()
        self.item = self.sums.item = item
        self._calls = {}

    def finish_item(self) -> None:
        """File the current item's ``XᵀX`` sums (each item's are added as one, in the fixed order)."""
        place = self.item if self.places is None else self.places.get(self.item, self.item)
        self.sums.finish_item(place)  # on the inputs' device until now: one copy per item

    def take_moments(self) -> dict[str, MomentSum]:
        """Layer name → its ``XᵀX`` sums (layers that read the same inputs hold the very same object), handed
        over: the recorder lets go of them, so whoever merges them can free each as it goes."""
        return self.sums.take()

    def hook(self, name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            given = args[0] if args else kwargs["input"]
            x = given.detach()
            x2 = x.reshape(-1, x.shape[-1])
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            if x2.shape[0] == 0:
                return
            if name in self.hessian_layers and (self.places is None or self.item in self.places):
                k, rows = x2.shape[1], x2.shape[0]
                fraction = call_fraction(self.rows_per_column, k, rows, self.xtx_calls)
                if keeps_call(self.seed, k, rows, self.item, call, fraction):
                    self.sums.add(name, given, x2)  # the object itself: a layer reading the same one shares the sum
                    self.hessian_rows[name] = self.hessian_rows.get(name, 0) + rows
            if self.energy is not None:
                e = torch.linalg.vector_norm(x2, dim=0, dtype=torch.float32).double().cpu().square()
                self.energy[name] = e if name not in self.energy else self.energy[name] + e
            if not self.record_stats:
                return
            stats = self.stats
            m = x2.abs().amax(dim=0).float().cpu()
            prev = stats.act_absmax.get(name)
            stats.act_absmax[name] = m if prev is None else torch.maximum(prev, m)
            stats.num_tokens[name] = stats.num_tokens.get(name, 0) + x2.shape[0]
            if self.max_samples:
                keys = self._keys(name, call, x2.shape[0])
                if keys.numel() > self.max_samples:
                    idx = torch.argsort(keys, stable=True)[: self.max_samples]
                    keys, rows = keys[idx], x2[idx.to(x2.device)]
                else:
                    rows = x2
                keep_bottom_k(stats, name, keys, rows.cpu().clone(), self.max_samples)

        return record

    def _keys(self, name: str, call: int, rows: int) -> torch.Tensor:
        # crc32, not hash(): Python salts str hashes per process and every rank must agree.
        seed = zlib.crc32(f"{self.seed}/{name}/{self.item}/{call}".encode())
        return torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@contextmanager
def forward_pre_hooks(hooks: Iterable[tuple[nn.Module, Callable[[nn.Module, tuple, dict], None]]]) -> Iterator[None]:
    """Each ``(module, hook)`` registered as a forward pre-hook (with kwargs) and the block run under
    ``torch.no_grad``; the hooks are removed however the block ends."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m, hook in hooks]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()


def record(layers: dict[str, nn.Linear], recorder: Recorder, drive: Callable[[Recorder], None]) -> None:
    """One pass over the calibration inputs with ``recorder``'s hooks on ``layers`` (removed however it ends)."""
    with forward_pre_hooks((m, recorder.hook(n)) for n, m in layers.items()):
        drive(recorder)
    recorder.finish_item()


class _FirstCall(Exception):
    """Raised after the calibrated model's first forward: the probe has seen enough."""


@dataclass
class FirstForward:
    """What rank 0's first forward of the calibrated model tells before any pass (the same on every rank).

    Attributes:
        together: layer → the first layer of its set, for the layers that read the very same input tensor (hold one
            ``XᵀX``, :class:`~.hessian.SharedMoments`): what the pass plan needs to count a shared sum once and keep
            its layers in one pass.
        energy: layer → its inputs' per-channel ``Σ x_j²`` over that forward (float64 ``[K]``): the probe that
            sizes the fixed-point units (:meth:`~.fixedpoint.FixedPointSum.from_probe`). A layer the forward did not
            call is absent.
    """

    together: dict[str, str]
    energy: dict[str, torch.Tensor]


def first_forward(
    model: nn.Module, layers: dict[str, nn.Linear], drive: Callable[[Recorder], None], procs: Processes
) -> FirstForward:
    """Run the calibration inputs until the model's first forward ends (the whole drive when it never calls the model
    as a whole, as a ``run`` may not), with no ``XᵀX`` formed: about one forward of the thousands a calibration runs.
    Every rank runs it (a ``run`` may hold collectives) and rank 0's is used: its first item is item 0 however the
    items are split, so every split sees the same probe. A set of shared layers the recording later sees split is
    still recorded exactly (each layer its own sum; the plan only counted it once)."""
    recorder = Recorder(0, 0, layers, record_stats=False, compute_hessian=False, probe=True)

    def stop(*_: Any) -> None:
        raise _FirstCall

    handle = model.register_forward_hook(stop)
    try:
        record(layers, recorder, drive)
    except _FirstCall:
        recorder.finish_item()
    finally:
        handle.remove()
    found = ({n: g[0] for g in recorder.sums.groups() for n in g[1:]}, recorder.energy)
    together, energy = procs.gather(found if procs.rank == 0 else None)[0]
    return FirstForward(together, energy)
