"""``svdquant calibrate``, ``svdquant quantize`` and ``svdquant eval``.

All three run unchanged on one process or several::

    svdquant calibrate PIPELINE --out stats.safetensors
    accelerate launch --multi_gpu --num_processes N -m diffusers_svdquant.apps.cli calibrate PIPELINE --out ...
    torchrun --nproc_per_node N -m diffusers_svdquant.apps.cli calibrate PIPELINE --out ...

(``--multi_gpu`` is what makes accelerate start N processes even on a machine without a GPU; they
then join one gloo group.) Prompts are split between processes, the statistics merged, the
per-layer search split, and rank 0 writes the results. The options are in :mod:`svdquant_cli.arguments`
(``add_calibrate_arguments`` ...); this module runs the parsed commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..calibration import CalibrationStats, calibrate
from ..calibration.blocks import record_block_inputs, transformer_blocks
from ..calibration.processes import Processes
from ..calibration.recording import denoiser_name
from ..config import SVDQuantConfig
from ..dtypes import DTYPES

# Calls per block whose inputs `svdquant eval` keeps for the block errors (each a block's full activations).
BLOCK_CALLS = 2


def _read_prompts(path: Path | None, n: int | None, default: tuple[str, ...]) -> list[str]:
    if path is None:
        prompts = list(default)
    else:
        if not path.is_file():
            raise SystemExit(f"svdquant: prompts file {str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"svdquant: prompts file {str(path)!r} has no prompts")
    return prompts[:n] if n else prompts


def _load_pipeline(args: argparse.Namespace, procs: Processes, **kwargs: Any) -> Any:
    from diffusers import DiffusionPipeline

    if args.dtype:
        kwargs["dtype"] = DTYPES[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.model, revision=args.revision, **kwargs)
    if procs.state is not None and procs.state.device.type != "cpu":
        pipe.to(procs.state.device)
    elif procs.state is None and torch.cuda.is_available():
        pipe.to("cuda")
    return pipe


def _run_calibration(args: argparse.Namespace, procs: Processes, config: SVDQuantConfig) -> CalibrationStats:
    from ..calibration.prompts import CALIBRATION_PROMPTS

    pass_options = {
        "--hessian-passes": args.hessian_passes,
        "--hessian-budget-gib": args.hessian_budget_gib,
        "--hessian-dir": args.hessian_dir,
        "--hessian-sum": args.hessian_sum,
        "--hessian-prompts": args.hessian_prompts,
    }
    # "all" parses to None, which must still count as given
    rows_per_column = args.hessian_rows_per_column
    pass_options["--hessian-rows-per-column"] = True if rows_per_column != "auto" else None
    given = [flag for flag, value in pass_options.items() if value is not None]
    if given and not args.gptq:
        raise SystemExit(f"svdquant: {given[0]} needs --gptq")
    if args.hessian_passes is not None and args.hessian_passes < 1:
        raise SystemExit(f"svdquant: --hessian-passes must be >= 1, got {args.hessian_passes}")
    if args.hessian_prompts is not None and args.hessian_prompts < 1:
        raise SystemExit(f"svdquant: --hessian-prompts must be >= 1, got {args.hessian_prompts}")
    if args.hessian_budget_gib is not None and not args.hessian_budget_gib > 0:
        raise SystemExit(f"svdquant: --hessian-budget-gib must be > 0, got {args.hessian_budget_gib}")
    prompts = _read_prompts(args.prompts, args.num_prompts, CALIBRATION_PROMPTS)
    pipe = _load_pipeline(args, procs)
    try:
        return calibrate(
            pipe,
            prompts=prompts,
            num_inference_steps=args.steps,
            component=args.component,
            config=config,
            max_samples=args.max_samples,
            search=not args.no_search,
            seed=args.seed,
            pipeline_kwargs=args.pipeline_kwargs,
            hessian=args.gptq,
            hessian_passes=args.hessian_passes,
            hessian_budget_gib=args.hessian_budget_gib,
            hessian_dir=args.hessian_dir,
            hessian_sum=args.hessian_sum or "auto",
            hessian_prompts=args.hessian_prompts,
            hessian_rows_per_column=rows_per_column,
        )
    except ValueError as e:
        if str(e).startswith("calibrate:"):  # bad settings (a budget below one layer's sums...): one line
            raise SystemExit(f"svdquant: {e}") from e
        raise


def _summary(stats: CalibrationStats, seconds: float) -> str:
    searched = len(stats.smoothing)
    gain = [float(e[1] / e[0]) for e in stats.search_errors.values() if e[0] > 0]
    line = (
        f"calibrated {len(stats.act_absmax)} layers over {stats.info.get('prompts', '?')} prompts x "
        f"{stats.info.get('num_inference_steps', '?')} steps on {stats.info.get('num_processes', 1)} process(es) "
        f"in {seconds:.1f} s"
    )
    if searched:
        alphas = sorted(a for a, _ in stats.smoothing.values())
        line += (
            f"; smoothing searched for {searched} layers (median alpha {alphas[len(alphas) // 2]:.1f}, "
            f"output error vs no smoothing: {sum(gain) / max(len(gain), 1):.2f}x lower on average)"
        )
    if stats.info.get("hessian_sum"):
        retried = stats.info.get("hessian_retried") or []
        line += (
            f"; XᵀX over {stats.info.get('hessian_prompts', '?')} prompts, summed by {stats.info['hessian_sum']} in "
            f"{stats.info['hessian_passes']} pass(es)"
        )
        if stats.info.get("hessian_rows_per_column"):
            line += f", calls kept for about {stats.info['hessian_rows_per_column']} rows per input column"
        if stats.info.get("hessian_per_call"):  # a model on a GPU: 8 bytes per entry, one conversion per call
            line += ", each call added at once"
        if retried:  # their sums outgrew the units of the first forward's probe
            line += f", {len(retried)} layer(s) recorded again in units from the statistics"
    return line


def run_calibrate(args: argparse.Namespace) -> int:
    """``svdquant calibrate``: statistics (+ smoothing search) of the parsed ``args``; rank 0 writes ``--out``."""
    procs = Processes()
    start = time.perf_counter()
    stats = _run_calibration(args, procs, SVDQuantConfig(rank=args.rank))
    procs.close()
    if procs.rank == 0:
        stats.save(args.out, include_samples=args.include_samples)
        print(_summary(stats, time.perf_counter() - start))
        print(f"wrote {args.out}")
    return 0


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing ``out`` is kept until the new one is in."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def run_quantize(args: argparse.Namespace) -> int:
    """``svdquant quantize``: (calibrate +) quantize on load and save to ``--out``, replacing it only when done."""
    from diffusers import AutoModel, DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from .. import hub

    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"svdquant: {str(args.out)!r} exists; pass --overwrite to replace it")
    procs = Processes()
    start = time.perf_counter()
    is_pipeline = Path(args.model, "model_index.json").is_file() or not Path(args.model, "config.json").is_file()
    calibration: Any = None
    if args.calibrate:
        if not is_pipeline:
            raise SystemExit("svdquant: --calibrate needs a pipeline (prompts run through it); got a single model")
        calibration = _run_calibration(args, procs, SVDQuantConfig(rank=args.rank))
        if procs.rank == 0:
            print(_summary(calibration, time.perf_counter() - start))
    elif args.calibration is not None:
        calibration = str(args.calibration)
    procs.close()  # the rest runs on rank 0 alone
    if procs.rank != 0:
        return 0
    config = SVDQuantConfig(rank=args.rank, calibration=calibration)
    kwargs: dict[str, Any] = {"revision": args.revision}
    if args.dtype:
        kwargs["dtype"] = DTYPES[args.dtype]
    if is_pipeline:
        index = DiffusionPipeline.load_config(args.model, revision=args.revision)
        component = args.component or next((n for n in ("transformer", "unet") if n in index), None)
        if component not in index:
            raise SystemExit(f"svdquant: {args.model} has no component {component!r} (pass --component)")
        obj = DiffusionPipeline.from_pretrained(
            args.model, quantization_config=PipelineQuantizationConfig(quant_mapping={component: config}), **kwargs
        )
    else:
        obj = AutoModel.from_pretrained(args.model, quantization_config=config, **kwargs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Saved beside --out (one file system, so the final rename is atomic) in a folder made by a plain mkdir
    # inside a private scratch folder: mkdtemp's folders are mode 0700, and --out must get the umask's mode.
    scratch = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        tmp = scratch / args.out.name
        tmp.mkdir()
        hub.save_quantized(obj, tmp, repo_id=str(args.out), base_model=args.model)
        _replace_dir(tmp, args.out)
    finally:
        shutil.rmtree(scratch)
    print(f"quantized {args.model} (rank {args.rank}) in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``svdquant eval``: the quality report of each method against the 16-bit pipeline."""
    from diffusers import AutoModel

    from ..calibration.prompts import EVAL_PROMPTS
    from . import quality_report as quality

    procs = Processes()
    if args.calibration is not None:
        stats = CalibrationStats.load(args.calibration)
        if not stats.samples:
            print("note: the statistics file has no samples (--include-samples): no per-layer errors")
    else:
        stats = _run_calibration(args, procs, SVDQuantConfig(rank=args.rank))
    procs.close()  # the rest runs on rank 0 alone
    if procs.rank != 0:
        return 0
    prompts = _read_prompts(args.eval_prompts, args.num_eval_prompts, EVAL_PROMPTS)
    pipe = _load_pipeline(args, procs)
    component = args.component or denoiser_name(pipe)
    reference = getattr(pipe, component)
    call = {"num_inference_steps": args.eval_steps or args.steps} | args.pipeline_kwargs
    # The 16-bit blocks' inputs on the evaluation prompts (the first calls of each block), for the block errors.
    blocks = transformer_blocks(reference)
    generated: dict[str, torch.Tensor] = {}

    def reference_run(_model: torch.nn.Module) -> None:
        generated["images"], generated["latents"] = quality.generate(pipe, prompts, args.seed, **call)

    block_inputs = record_block_inputs(reference, reference_run, blocks, max_calls=BLOCK_CALLS)
    ref_images, ref_latents = generated["images"], generated["latents"]
    reports = []
    for name, config in quality.method_configs(args.rank, stats).items():
        kwargs: dict[str, Any] = {"subfolder": component, "revision": args.revision, "quantization_config": config}
        if args.dtype:
            kwargs["dtype"] = DTYPES[args.dtype]
        quantized = AutoModel.from_pretrained(args.model, **kwargs).to(reference.device)
        setattr(pipe, component, quantized)
        images, latents = quality.generate(pipe, prompts, args.seed, **call)
        report = quality.compare(name, images, latents, ref_images, ref_latents)
        report.layer_errors = quality.layer_errors(quantized, reference, stats)
        report.block_errors = quality.block_errors(quantized, reference, block_inputs)
        reports.append(report)
        setattr(pipe, component, reference)
    print(f"{len(prompts)} prompts, {call['num_inference_steps']} steps, seed {args.seed}, rank {args.rank}")
    print(quality.format_report(reports))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in reports], indent=1))
    return 0
