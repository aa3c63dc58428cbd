"""Calibration: activation statistics over real inputs, and the per-layer smoothing search.

SVDQuant's smoothing ``λ_j = max|X_j|^α / max|W_j|^β`` needs ``max|X_j|`` per layer, and picking
``(α, β)`` well needs real input rows to score candidates on. :func:`calibrate` runs the 16-bit
model (or a whole diffusers pipeline over prompts and denoising steps) with forward pre-hooks that
record, per target linear, the per-input-channel absmax and a bounded uniform sample of input
rows; then it searches ``(α, β)`` per layer (:func:`diffusers_svdquant.algorithm.search_smoothing`).

Across processes (``torchrun`` / ``accelerate launch --multi_gpu``, CPU or GPU): prompts are split
between ranks, the statistics are merged exactly (max, sums, bottom-k samples), the layer search
is split between ranks, and every rank ends with the same :class:`CalibrationStats`, so rank 0
writes it. The row sample is a *bottom-k* sample: every row gets a pseudo-random key derived from
(layer, prompt index, call, row), and the rows with the ``max_samples`` smallest keys are kept.
That is a uniform sample, and merging two of them is again the bottom-k of the union, so one
process and N processes keep exactly the same rows.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import SVDQuantConfig, quantizable_linears
from ..progress import progress_bar
from .fixedpoint import FixedPointSum
from .hessian import MomentSum, SharedMoments, merged_total, share_labels, shared_units
from .passes import GIB, ShardWriter, fixed_moment_bytes, moment_bytes, plan_passes, tree_copies
from .processes import Processes
from .prompts import CALIBRATION_PROMPTS
from .search import search_smoothing
from .stats import DEFAULT_MAX_SAMPLES, CalibrationStats, keep_bottom_k

# Layers that read the very same input tensor hold one XᵀX (hessian.SharedMoments); False gives each its own (the
# tests compare the two).
SHARE_INPUTS = True


class _Recorder:
    """Forward pre-hooks that fill a :class:`CalibrationStats` (absmax, token counts, row samples; with
    ``record_stats``) and each layer of ``hessian_layers``'s ``XᵀX`` per item (:class:`~.hessian.SharedMoments`;
    with ``compute_hessian=False`` only which layers share one)."""

    def __init__(
        self,
        max_samples: int,
        seed: int,
        hessian_layers: Collection[str] = (),
        record_stats: bool = True,
        compute_hessian: bool = True,
        new_sum: Callable[[str], MomentSum] | None = None,
    ) -> None:
        self.stats = CalibrationStats()
        self.max_samples = max_samples
        self.seed = seed
        self.item = 0  # index of the prompt (or run) being processed: part of every row's key
        self._calls: dict[str, int] = {}
        self.hessian_layers = frozenset(hessian_layers)
        self.record_stats = record_stats
        self.sums = SharedMoments(compute=compute_hessian, share=SHARE_INPUTS, new_sum=new_sum)

    def start_item(self, item: int) -> None:
        self.finish_item()
        self.item = item
        self._calls = {}

    def finish_item(self) -> None:
        """File the current item's ``XᵀX`` sums (each item's are added as one, in the fixed order)."""
        self.sums.finish_item(self.item)  # on the inputs' device until now: one copy per item

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
            if name in self.hessian_layers:
                self.sums.add(name, given, x2)  # the object itself: a layer reading the same one shares the sum
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


def _target_linears(model: nn.Module, config: Any | None, module_filter: Callable | None) -> dict[str, nn.Linear]:
    if config is not None:
        layers = quantizable_linears(model, config)
    else:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if module_filter is not None:
        layers = {n: m for n, m in layers.items() if module_filter(n, m)}
    return layers


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


def _record(layers: dict[str, nn.Linear], recorder: _Recorder, drive: Callable[[_Recorder], None]) -> None:
    """One pass over the calibration inputs with ``recorder``'s hooks on ``layers`` (removed however it ends)."""
    with forward_pre_hooks((m, recorder.hook(n)) for n, m in layers.items()):
        drive(recorder)
    recorder.finish_item()


class _FirstCall(Exception):
    """Raised after the calibrated model's first forward: the search for shared inputs has seen enough."""


def _shared_inputs(
    model: nn.Module, layers: dict[str, nn.Linear], drive: Callable[[_Recorder], None], procs: Processes
) -> dict[str, str]:
    """Layer → the first layer of its set, for the layers that read the very same input tensor (hold one ``XᵀX``,
    :class:`~.hessian.SharedMoments`), as rank 0 finds them: what the pass plan needs to count a shared sum once and
    keep its layers in one pass, known before any pass. Found on the model's first forward only (the whole drive
    when it never calls the model as a whole, as a ``run`` may not), with no ``XᵀX`` formed: about one forward. A
    set the recording later sees split is still recorded exactly (each layer its own sum; the plan held it once)."""
    recorder = _Recorder(0, 0, layers, record_stats=False, compute_hessian=False)

    def stop(*_: Any) -> None:
        raise _FirstCall

    handle = model.register_forward_hook(stop)
    try:
        _record(layers, recorder, drive)
    except _FirstCall:
        recorder.finish_item()
    finally:
        handle.remove()
    return procs.gather({n: g[0] for g in recorder.sums.groups() for n in g[1:]})[0]


def _hessian_groups(
    layers: dict[str, nn.Linear],
    items: list[int],
    procs: Processes,
    passes: int | None,
    budget_gib: float | None,
    shared_inputs: Callable[[], dict[str, str]],
    fixed: bool = False,
) -> list[list[str]]:
    """The layers whose ``XᵀX`` each pass records (:func:`~.passes.plan_passes`), the same on every rank: sized by
    the most partial sums any process holds (:func:`~.passes.tree_copies` of its items), a sum that layers share
    (``shared_inputs()``, called only when there is more than one pass to plan) counted once."""
    if fixed:  # one int64 sum and the item in progress, however the items are split
        sizes = [(name, fixed_moment_bytes(m.in_features)) for name, m in layers.items()]
    else:
        copies = max(1, *procs.gather(tree_copies(items)))
        sizes = [(name, moment_bytes(m.in_features, copies)) for name, m in layers.items()]
    budget = None if budget_gib is None else int(budget_gib * GIB)
    groups = plan_passes(sizes, passes=passes, budget_bytes=budget)  # checks the arguments before any forward
    if len(groups) <= 1:  # sharing only lowers the bytes: still one pass
        return groups
    return plan_passes(sizes, passes=passes, budget_bytes=budget, together=shared_inputs())


def _auto_sum(
    layers: dict[str, nn.Linear],
    total_items: int,
    budget_gib: float | None,
    shared_inputs: Callable[[], dict[str, str]],
) -> str:
    """``hessian_sum="auto"``: fixed point when, under a memory budget, its passes plus its statistics pass are fewer
    than the tree's. Decided from what every process knows alike (the total item count, the tree's partial sums as
    if one process held every item, rank 0's shared sets), so every split decides the same and gives the same bits."""
    if budget_gib is None:
        return "tree"  # one pass, or the passes asked for: the tree needs no statistics pass first
    budget, copies = int(budget_gib * GIB), tree_copies(range(total_items))
    if copies <= 3:  # 4 bytes x copies <= fixed point's 12 per packed entry: the tree never holds more
        return "tree"
    together = shared_inputs()
    plans: dict[str, int | None] = {}
    for mode, per in (("tree", lambda k: moment_bytes(k, copies)), ("fixed", fixed_moment_bytes)):
        try:
            plans[mode] = len(plan_passes([(n, per(m.in_features)) for n, m in layers.items()],
                                          budget_bytes=budget, together=together))  # fmt: skip
        except ValueError:  # a layer alone over the budget in this mode
            plans[mode] = None
    if plans["fixed"] is not None and (plans["tree"] is None or plans["fixed"] + 1 < plans["tree"]):
        return "fixed"
    return "tree"


def _fixed_point_sums(stats: CalibrationStats, index: int) -> Callable[[str], FixedPointSum]:
    """The int64 sum of a layer's XᵀX in pass ``index``, its units sized from the statistics pass's absmax and row
    count (merged over every process: the same units everywhere, :mod:`~.fixedpoint`)."""

    def new_sum(name: str) -> FixedPointSum:
        absmax, rows = stats.act_absmax.get(name), stats.num_tokens.get(name, 0)
        if absmax is None or rows < 1:
            raise ValueError(
                f"calibrate: layer {name} has inputs in pass {index + 1} but had none in the statistics pass: "
                "every pass must run the model on the same inputs"
            )
        return FixedPointSum(absmax, rows, name)

    return new_sum


def _is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def denoiser_name(pipe: Any) -> str:
    """The attribute name of a pipeline's denoiser: ``transformer`` or ``unet``."""
    for name in ("transformer", "unet"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no `transformer` or `unet`; pass component=... to calibrate")


def calibrate(
    target: Any,
    run: Callable[[nn.Module], Any] | None = None,
    *,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int = 8,
    component: str | None = None,
    config: Any | None = None,
    module_filter: Callable[[str, nn.Linear], bool] | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    search: bool | None = None,
    seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    hessian: bool = False,
    hessian_passes: int | None = None,
    hessian_budget_gib: float | None = None,
    hessian_dir: str | os.PathLike | None = None,
    hessian_sum: str = "auto",
) -> CalibrationStats:
    """Collect activation statistics with the 16-bit model and search each layer's smoothing.

    Two ways to drive the model::

        stats = calibrate(pipe, prompts=[...], num_inference_steps=8)   # a diffusers pipeline
        stats = calibrate(model, run=lambda m: m(**batch))                # any module + a callable

    With a pipeline, its denoiser (``component``, default ``transformer`` or ``unet``) is hooked
    and the pipeline generates every prompt (default:
    :data:`~diffusers_svdquant.calibration.prompts.CALIBRATION_PROMPTS`) with
    ``generator = manual_seed(seed + i)`` and ``output_type="latent"``; under several processes the
    prompts are split between them. With ``run``, each process calls ``run(model)`` once (split the
    data yourself when launching several).

    Args:
        target: a ``DiffusionPipeline`` or an ``nn.Module``.
        run: with a module, called once with it, under ``torch.no_grad``.
        prompts: with a pipeline, the calibration prompts.
        num_inference_steps: with a pipeline, denoising steps per prompt.
        component: with a pipeline, the attribute name of the module to calibrate.
        config: an :class:`~diffusers_svdquant.SVDQuantConfig`: only the layers it quantizes are
            recorded, and its ``rank`` / ``svd_method`` are what the search scores with. Default:
            ``SVDQuantConfig()`` with a pipeline; every ``nn.Linear`` (and
            :data:`~diffusers_svdquant.config.DEFAULT_RANK`) with a module.
        module_filter: ``(name, linear) -> bool`` to restrict the recorded layers further.
        max_samples: input rows kept per layer for the search (0: none, no search).
        search: search ``(α, β)`` per layer (default: when ``max_samples > 0``).
        seed: seeds the pipeline's generators and the row sampling.
        pipeline_kwargs: extra arguments for every pipeline call (``height``, ``guidance_scale``...).
        progress: tqdm bars on rank 0.
        hessian: also gather each layer's ``XᵀX`` (float32 ``[K, K]``), which makes quantization round the
            residual with GPTQ (``SVDQuantConfig.gptq``). Memory: about ``2·K²`` bytes per sum, its upper triangle
            (:mod:`~.packed`), times about ``log2`` of the items per process while recording
            (:func:`~.passes.tree_copies`); layers that read the very same input tensor (attention's q / k / v)
            hold one sum (:class:`~.hessian.SharedMoments`), with the bits each would have alone. Merged exactly
            across processes, and the same bits however many passes.
        hessian_passes: gather ``XᵀX`` in this many passes (default 1): each pass runs every prompt (or
            ``run``, which must then feed the same inputs each time) again and records the sums of one
            contiguous group of layers (a set sharing one sum kept whole; the sets are found on the model's first
            forward beforehand), which are merged and written to disk before the next pass; the first pass also
            records the absmax and samples of every layer. Memory: the largest group's sums.
        hessian_budget_gib: instead of ``hessian_passes``, as few passes as keep each group's sums while
            recording within this many GiB per process (the model, its activations and the row samples are
            extra; a layer whose sums alone exceed it is an error).
        hessian_dir: the folder for the passes' shards (``hessian-NNNNN.safetensors``, kept); default a
            temporary folder removed with the returned statistics. Given, even one pass goes to disk. Rank 0
            writes the shards and every rank's statistics refer to them (several machines need a shared folder).
        hessian_sum: how the items' ``XᵀX`` are added so that the bits do not depend on the process split:
            ``"tree"``, float32 along a fixed binary tree (up to ``log2`` of the items per process partial sums
            per layer while recording); ``"fixed"``, int64 fixed point (:mod:`~.fixedpoint`): one 8-byte sum per
            entry and the item in progress (about ``6·K²`` bytes per layer however many prompts), at the cost of one
            more run of the prompts first, for the statistics that size its units (FLUX.1 at 128 prompts on one
            process holds 3x less, so a budget needs a third of the passes: ``benchmarks/bench_calibration.py``).
            ``"auto"`` (default): fixed point when ``hessian_budget_gib`` is given and its passes, plus that
            statistics pass, are fewer than the tree's (as if one process held every prompt, so that every split
            chooses alike); else the tree. ``stats.info["hessian_sum"]`` says which ran.

    Returns:
        :class:`CalibrationStats` (float32 ``[K]`` absmax on the CPU), the same on every rank.
    """
    procs = Processes()
    search = max_samples > 0 if search is None else search
    if search and max_samples <= 0:
        raise ValueError("calibrate: search=True needs max_samples > 0 input rows per layer")
    if _is_pipeline(target):
        if run is not None:
            raise ValueError("calibrate: pass prompts for a pipeline, run= only for a module")
        component = component or denoiser_name(target)
        model = getattr(target, component, None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"calibrate: pipeline {type(target).__name__} has no module component {component!r}")
        config = config if config is not None else SVDQuantConfig()
        prompts = list(CALIBRATION_PROMPTS if prompts is None else prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("calibrate: prompts must be a non-empty list of strings")
        if num_inference_steps < 1:
            raise ValueError(f"calibrate: num_inference_steps must be >= 1, got {num_inference_steps}")

        items, total_items = procs.my_share(len(prompts)), len(prompts)

        def drive(recorder: _Recorder, desc: str | None) -> None:
            kwargs = {"num_inference_steps": num_inference_steps, "output_type": "latent"} | (pipeline_kwargs or {})
            bar = progress_bar(items, desc=desc or "", enabled=desc is not None and progress and procs.rank == 0)
            target.set_progress_bar_config(disable=True)
            for i in bar:
                recorder.start_item(i)
                device = getattr(target, "device", torch.device("cpu"))
                gen = torch.Generator(device=device).manual_seed(seed + i)
                target(prompt=prompts[i], generator=gen, **kwargs)

        info = {"prompts": len(prompts), "num_inference_steps": num_inference_steps, "component": component}
    else:
        if not isinstance(target, nn.Module) or run is None:
            raise TypeError("calibrate: pass a DiffusionPipeline (with prompts) or an nn.Module with run=callable")
        model = target

        items, total_items = [procs.rank], procs.world

        def drive(recorder: _Recorder, desc: str | None) -> None:
            recorder.start_item(procs.rank)
            run(model)

        info = {}

    layers = _target_linears(model, config, module_filter)
    # What the statistics were made from, so applying them to another model is refused, not silent.
    info |= {
        "model_class": type(model).__name__,
        "layers": {n: [m.out_features, m.in_features] for n, m in layers.items()},
    }
    if not hessian and (hessian_passes, hessian_budget_gib, hessian_dir, hessian_sum) != (None, None, None, "auto"):
        raise ValueError("calibrate: hessian_passes, hessian_budget_gib, hessian_dir and hessian_sum need hessian=True")
    if hessian_sum not in ("auto", "tree", "fixed"):
        raise ValueError(f"calibrate: hessian_sum must be 'auto', 'tree' or 'fixed', got {hessian_sum!r}")
    budget = hessian_budget_gib
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise ValueError(f"calibrate: hessian_budget_gib must be a number of GiB, got {budget!r}")
    groups = []
    if hessian:

        @functools.cache
        def shared_inputs() -> dict[str, str]:
            return _shared_inputs(model, layers, lambda r: drive(r, None), procs)  # no progress bar

        if hessian_sum == "auto":
            hessian_sum = _auto_sum(layers, total_items, hessian_budget_gib, shared_inputs)
        groups = _hessian_groups(
            layers, items, procs, hessian_passes, hessian_budget_gib, shared_inputs, fixed=hessian_sum == "fixed"
        )
    shards = ShardWriter(procs, hessian_dir) if len(groups) > 1 or (groups and hessian_dir is not None) else None
    # Pass 0 records every layer's statistics and the first group's XᵀX; each later pass runs the prompts again
    # for the next group's XᵀX alone, so the sums held at once are one group's. In fixed point, pass 0 records the
    # statistics alone: every layer's units come from them (absmax and rows) before any of its XᵀX is summed.
    fixed = hessian and hessian_sum == "fixed"
    runs = [[], *groups] if fixed else groups or [[]]
    stats: CalibrationStats | None = None  # after pass 0
    for p, group in enumerate(runs):
        new_sum = _fixed_point_sums(stats, p) if fixed and stats is not None else None
        recorder = _Recorder(max_samples, seed, group, record_stats=p == 0, new_sum=new_sum)
        hooked = layers if p == 0 else {n: layers[n] for n in group}
        desc = "calibration prompts" + (f" (pass {p + 1}/{len(runs)})" if len(runs) > 1 else "")
        _record(hooked, recorder, lambda r, d=desc: drive(r, d))
        if p == 0:
            stats = CalibrationStats.merge(procs.gather(recorder.stats), max_samples)
        if group and shards is not None:
            files, aliases = shards.write(p - fixed, recorder.take_moments(), group)
            stats.hessian_files |= files
            stats.hessian_alias |= aliases
        elif group:
            moments = procs.gather(recorder.take_moments())
            # A sum the layers share on every process is merged once and held once (the same tensor for each).
            for unit in shared_units(group, [share_labels(part) for part in moments]):
                found = [part[unit[0]] for part in moments if unit[0] in part]
                for part in moments:  # let go of the packed sums as their totals are made
                    for name in unit:
                        part.pop(name, None)
                total = merged_total(found)
                del found
                stats.hessian |= dict.fromkeys(unit, total)
        del recorder
    if shards is not None:
        shards.keep_with(stats)
    if hessian:
        info |= {"hessian_passes": len(groups), "hessian_sum": hessian_sum}
    stats.info = info | {"num_processes": procs.world, "max_samples": max_samples, "seed": seed}
    if search:
        search_smoothing(model, stats, config, procs=procs, progress=progress)
    return stats
