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
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from ..config import SVDQuantConfig, quantizable_linears
from ..progress import progress_bar
from .passes import ShardWriter, auto_sum, merge_in_memory, new_sums, plan_groups, retry_groups, spread_items
from .processes import Processes
from .prompts import CALIBRATION_PROMPTS
from .recorder import DEFAULT_ROWS_PER_COLUMN, Recorder, first_forward, fixed_per_call, per_call_forced, record
from .search import search_smoothing
from .stats import DEFAULT_MAX_SAMPLES, CalibrationStats


def _target_linears(model: nn.Module, config: Any | None, module_filter: Callable | None) -> dict[str, nn.Linear]:
    if config is not None:
        layers = quantizable_linears(model, config)
    else:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if module_filter is not None:
        layers = {n: m for n, m in layers.items() if module_filter(n, m)}
    return layers


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
    hessian_prompts: int | None = None,
    hessian_rows_per_column: int | str | None = "auto",
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
            entry and the item in progress (about ``6·K²`` bytes per layer however many prompts; FLUX.1 at 128
            prompts on one process holds 3x less, so a budget needs a third of the passes:
            ``benchmarks/bench_calibration.py``). Its units are sized from a probe, the model's first forward (one
            more forward, run before the passes), with room for ``2^35`` times the probe's energy per channel; a
            layer whose sum outgrows them is recorded again after the planned passes, in units from the
            statistics (``stats.info["hessian_retried"]``; ``stats.info["hessian_headroom_bits"]``: the fewest
            doublings any probed sum had left). ``"auto"`` (default): fixed point when it holds less (8 prompts or
            more in all, 4 or more with the model on a GPU, counted as if one process held them, so that every
            split chooses alike); else the tree. ``stats.info["hessian_sum"]`` says which ran. With the model on a
            GPU, fixed point adds each call's sums at once (no float32 sum of the prompt in progress: about ``4·K²``
            bytes per layer; ``stats.info["hessian_per_call"]``), unless ``hessian_budget_gib`` holds the sums
            of the prompt in progress in as few passes: then per prompt, converting a step count times less often.
        hessian_prompts: with a pipeline, gather ``XᵀX`` over this many of the prompts, spread evenly (prompt 0
            among them; default every prompt): the passes after the first run those prompts alone, and the sums
            cost that share of the ``XᵀX`` FLOPs. The statistics and the search still see every prompt. GPTQ needs
            far fewer rows than the smoothing statistics: ``K`` rows make ``XᵀX`` full rank and every FLUX.1 prompt
            gives 8 steps x 4,608 rows (README: the quality measured against the prompts used).
        hessian_rows_per_column: with a pipeline and fixed-point sums, each layer's ``XᵀX`` sums the rows of
            a pseudo-random share of its calls (the same on any process split, and for layers that share one sum),
            about this many rows per input column over the ``XᵀX`` prompts x steps: a layer whose calls offer no
            more keeps every call. ``"auto"`` (default): :data:`~.recorder.DEFAULT_ROWS_PER_COLUMN` (64: the
            W4A4 output error within 0.05% of every call's, README) with fixed point, every call with the tree
            (its partial sums assume every item adds one) or ``run=``; an integer makes ``hessian_sum="auto"``
            fixed point; ``None``: every call. On FLUX.1 (128 prompts x 8 steps) its wide layers keep about a fifth
            of their calls: the ``XᵀX`` FLOPs fall to 0.21 of every call's, the per-call conversions to 0.37.
            ``stats.hessian_rows`` has the rows each ``XᵀX`` summed (what GPTQ's damping reads).

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
        xtx_items = spread_items(total_items, hessian_prompts)

        def drive(recorder: Recorder, desc: str | None, only: Collection[int] | None = None) -> None:
            kwargs = {"num_inference_steps": num_inference_steps, "output_type": "latent"} | (pipeline_kwargs or {})
            mine = [i for i in items if only is None or i in only]
            bar = progress_bar(mine, desc=desc or "", enabled=desc is not None and progress and procs.rank == 0)
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

        if hessian_prompts is not None:
            raise ValueError("calibrate: hessian_prompts is for a pipeline's prompts; with run=, feed fewer rows")
        if hessian_rows_per_column != "auto" and hessian_rows_per_column is not None:
            raise ValueError("calibrate: hessian_rows_per_column is for a pipeline's steps; with run=, feed fewer rows")
        items, total_items = [procs.rank], procs.world
        xtx_items = spread_items(total_items, None)

        def drive(recorder: Recorder, desc: str | None, only: Collection[int] | None = None) -> None:
            recorder.start_item(procs.rank)
            run(model)

        info = {}

    layers = _target_linears(model, config, module_filter)
    # What the statistics were made from, so applying them to another model is refused, not silent.
    info |= {
        "model_class": type(model).__name__,
        "layers": {n: [m.out_features, m.in_features] for n, m in layers.items()},
    }
    xtx_options = (hessian_passes, hessian_budget_gib, hessian_dir, hessian_prompts)
    if not hessian and (
        hessian_sum != "auto" or hessian_rows_per_column != "auto" or any(o is not None for o in xtx_options)
    ):
        raise ValueError(
            "calibrate: hessian_passes, hessian_budget_gib, hessian_dir, hessian_sum, hessian_prompts and "
            "hessian_rows_per_column need hessian=True"
        )
    rows_per_column = hessian_rows_per_column
    if rows_per_column not in ("auto", None) and (
        isinstance(rows_per_column, bool) or not isinstance(rows_per_column, int) or rows_per_column < 1
    ):
        raise ValueError(
            f"calibrate: hessian_rows_per_column must be 'auto', None or an integer >= 1, got {rows_per_column!r}"
        )
    if isinstance(rows_per_column, int) and hessian_sum == "tree":
        raise ValueError(
            "calibrate: hessian_rows_per_column needs fixed-point sums (the tree's partial sums assume every item "
            "adds one); pass hessian_sum='fixed' or 'auto'"
        )
    if hessian_sum not in ("auto", "tree", "fixed"):
        raise ValueError(f"calibrate: hessian_sum must be 'auto', 'tree' or 'fixed', got {hessian_sum!r}")
    budget = hessian_budget_gib
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise ValueError(f"calibrate: hessian_budget_gib must be a number of GiB, got {budget!r}")
    groups: list[list[str]] = []
    per_call = False
    later: list[str] = []  # fixed point: layers recorded after the planned passes, in units from the statistics
    probe = functools.cache(lambda: first_forward(model, layers, lambda r: drive(r, None), procs))  # no bar
    if hessian:
        per_call = fixed_per_call(model)
        if hessian_sum == "auto":
            hessian_sum = "fixed" if isinstance(rows_per_column, int) else auto_sum(len(xtx_items), per_call)
        fixed = hessian_sum == "fixed"
        per_call = per_call and fixed
        energy = probe().energy if fixed else {}
        planned = {n: m for n, m in layers.items() if n in energy} if fixed else layers
        later = [n for n in layers if n not in planned]  # not called in the first forward: no probe
        plan = functools.partial(
            plan_groups,
            planned,
            [xtx_items[i] for i in items if i in xtx_items],  # their places in the summation tree
            procs,
            hessian_passes,
            hessian_budget_gib,
            lambda: probe().together,
            fixed=fixed,
        )
        groups = plan(per_call=per_call)
        if per_call and hessian_budget_gib is not None and not per_call_forced():
            # Adding per prompt converts a step count times less often (20 bytes of memory traffic per entry each
            # time): taken when its 12 bytes per entry need no more passes within the budget than per call's 8.
            by_prompt = plan(per_call=False)
            if len(by_prompt) <= len(groups):
                per_call, groups = False, by_prompt
    if rows_per_column == "auto":
        rows_per_column = DEFAULT_ROWS_PER_COLUMN if hessian_sum == "fixed" and _is_pipeline(target) else None
    # The calls each layer is expected to see: a pipeline calls its denoiser once per step (classifier-free guidance
    # batches its two halves). One that calls it more often keeps more rows than asked for; one that runs fewer
    # steps than num_inference_steps (an img2img strength) keeps that share fewer.
    xtx_calls = len(xtx_items) * num_inference_steps if _is_pipeline(target) else 1
    shards = ShardWriter(procs, hessian_dir) if len(groups) > 1 or (hessian and hessian_dir is not None) else None
    # Pass 0 records every layer's statistics and the first group's XᵀX; each later pass runs the prompts again
    # for the next group's XᵀX alone, so the sums held at once are one group's. In fixed point the planned passes
    # size each layer's units from the probe; a layer whose sum outgrew them (or that had no probe) is recorded in
    # passes after them, in units from the statistics, which it cannot outgrow.
    runs: list[tuple[list[str], str]] = [(g, "probe" if hessian_sum == "fixed" else "tree") for g in groups]
    runs = runs or [([], "tree")]
    stats: CalibrationStats | None = None  # after pass 0
    retried: list[str] = []
    headroom: list[float] = []  # what each sum in a probe's units had left (bits)
    p = 0
    while p < len(runs):
        group, units = runs[p]
        new_sum = new_sums(units, probe, stats, p)
        recorder = Recorder(
            max_samples, seed, group, record_stats=p == 0, new_sum=new_sum, places=xtx_items, per_call=per_call,
            rows_per_column=rows_per_column, xtx_calls=xtx_calls,
        )  # fmt: skip
        hooked = layers if p == 0 else {n: layers[n] for n in group}
        desc = "calibration prompts" + (f" (pass {p + 1}/{len(runs)})" if len(runs) > 1 else "")
        # After pass 0 only the prompts whose XᵀX is gathered run again.
        record(hooked, recorder, lambda r, d=desc, p=p: drive(r, d, xtx_items if p else None))
        if p == 0:
            stats = CalibrationStats.merge(procs.gather(recorder.stats), max_samples)
        if group:
            rows: dict[str, int] = {}
            for part in procs.gather(recorder.hessian_rows):
                for name in group:
                    rows[name] = rows.get(name, 0) + part.get(name, 0)
            stats.hessian_rows |= rows  # a layer recorded again (its sum outgrew its units) replaces its rows
            if shards is not None:
                merged = shards.write(p, recorder.take_moments(), group)
            else:
                merged = merge_in_memory(procs.gather(recorder.take_moments()), group, stats)
            stats.hessian_files |= merged.files
            stats.hessian_alias |= merged.aliases
            later += merged.overflowed
            headroom += merged.headroom
        del recorder
        if p == len(runs) - 1 and later:
            retried = [n for n in layers if n in later]  # in module order
            retries = retry_groups(retried, layers, runs, hessian_budget_gib, probe, per_call)
            runs += [(g, "statistics") for g in retries]
            later = []
        p += 1
    if shards is not None:
        shards.keep_with(stats)
    if hessian:
        info |= {"hessian_passes": sum(bool(g) for g, _ in runs), "hessian_sum": hessian_sum}
        info |= {"hessian_prompts": len(xtx_items)} if _is_pipeline(target) else {}
        info["hessian_rows_per_column"] = rows_per_column
        if hessian_sum == "fixed":
            info["hessian_retried"] = retried
            info["hessian_headroom_bits"] = round(min(headroom), 1) if headroom else None
            info["hessian_per_call"] = per_call
    stats.info = info | {"num_processes": procs.world, "max_samples": max_samples, "seed": seed}
    if search:
        search_smoothing(model, stats, config, procs=procs, progress=progress)
    return stats
