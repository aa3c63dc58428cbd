"""``svdquant calibrate``, ``svdquant quantize`` and ``svdquant eval``.

All three run unchanged on one process or several::

    svdquant calibrate PIPELINE --out stats.safetensors
    accelerate launch --multi_gpu --num_processes N -m diffusers_svdquant.apps.cli calibrate PIPELINE --out ...
    torchrun --nproc_per_node N -m diffusers_svdquant.apps.cli calibrate PIPELINE --out ...

(``--multi_gpu`` is what makes accelerate start N processes even on a machine without a GPU; they
then join one gloo group.) Prompts are split between processes, the statistics merged, the
per-layer search split, and rank 0 writes the results.
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
from ..calibration.processes import Processes
from ..calibration.recording import denoiser_name
from ..calibration.stats import DEFAULT_MAX_SAMPLES
from ..config import DEFAULT_RANK, SVDQuantConfig
from ..dtypes import DTYPES


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a diffusers pipeline: a local folder or a Hub repo id")
    p.add_argument("--component", default=None, help="the module to quantize (default: transformer or unet)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="load dtype (default: as saved)")
    p.add_argument("--revision", default=None)
    p.add_argument("--pipeline-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="extra arguments for every pipeline call, e.g. {\"height\": 512}")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=Path, default=None, help="a text file, one prompt per line (default: shipped)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per calibration prompt")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES, help="input rows kept per layer")
    p.add_argument("--no-search", action="store_true", help="statistics only, no (alpha, beta) search")


def add_commands(subparsers: Any) -> None:
    """Add ``calibrate``, ``quantize`` and ``eval`` to the ``svdquant`` command."""
    p = subparsers.add_parser("calibrate", help="activation statistics + per-layer smoothing search")
    _add_pipeline_args(p)
    _add_calibration_args(p)
    p.add_argument("--out", type=Path, required=True, help="the statistics file to write (.safetensors)")
    p.add_argument("--include-samples", action="store_true", help="also store the sampled input rows")
    p.set_defaults(func=_calibrate_command)

    p = subparsers.add_parser("quantize", help="(calibrate +) quantize + save_pretrained, one shot")
    _add_pipeline_args(p)
    _add_calibration_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder to write the quantized pipeline (or model) to")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--calibration", type=Path, default=None, help="a statistics file from `svdquant calibrate`")
    source.add_argument("--calibrate", action="store_true", help="calibrate first (a pipeline only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_quantize_command)

    p = subparsers.add_parser("eval", help="quality report: 16-bit vs naive W4A4 / SmoothQuant / SVDQuant")
    _add_pipeline_args(p)
    _add_calibration_args(p)
    p.add_argument("--calibration", type=Path, default=None, help="statistics file (default: calibrate here)")
    p.add_argument("--eval-prompts", type=Path, default=None, help="prompts to compare on (default: shipped)")
    p.add_argument("--num-eval-prompts", type=int, default=4)
    p.add_argument("--eval-steps", type=int, default=None, help="denoising steps when comparing (default: --steps)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.set_defaults(func=_eval_command)


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
        kwargs["torch_dtype"] = DTYPES[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.model, revision=args.revision, **kwargs)
    if procs.state is not None and procs.state.device.type != "cpu":
        pipe.to(procs.state.device)
    elif procs.state is None and torch.cuda.is_available():
        pipe.to("cuda")
    return pipe


def _run_calibration(args: argparse.Namespace, procs: Processes, config: SVDQuantConfig) -> CalibrationStats:
    from ..calibration.prompts import CALIBRATION_PROMPTS

    prompts = _read_prompts(args.prompts, args.num_prompts, CALIBRATION_PROMPTS)
    pipe = _load_pipeline(args, procs)
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
    )


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
    return line


def _calibrate_command(args: argparse.Namespace) -> int:
    procs = Processes()
    start = time.perf_counter()
    stats = _run_calibration(args, procs, SVDQuantConfig(rank=args.rank))
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


def _quantize_command(args: argparse.Namespace) -> int:
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
    if procs.rank != 0:
        return 0
    config = SVDQuantConfig(rank=args.rank, calibration=calibration)
    kwargs: dict[str, Any] = {"revision": args.revision}
    if args.dtype:
        kwargs["torch_dtype"] = DTYPES[args.dtype]
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        hub.save_quantized(obj, tmp, repo_id=str(args.out), base_model=args.model)
        _replace_dir(tmp, args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"quantized {args.model} (rank {args.rank}) in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
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
    if procs.rank != 0:
        return 0
    prompts = _read_prompts(args.eval_prompts, args.num_eval_prompts, EVAL_PROMPTS)
    pipe = _load_pipeline(args, procs)
    component = args.component or denoiser_name(pipe)
    reference = getattr(pipe, component)
    call = {"num_inference_steps": args.eval_steps or args.steps} | args.pipeline_kwargs
    ref_images, ref_latents = quality.generate(pipe, prompts, args.seed, **call)
    reports = []
    for name, config in quality.method_configs(args.rank, stats).items():
        kwargs: dict[str, Any] = {"subfolder": component, "revision": args.revision, "quantization_config": config}
        if args.dtype:
            kwargs["torch_dtype"] = DTYPES[args.dtype]
        quantized = AutoModel.from_pretrained(args.model, **kwargs).to(reference.device)
        setattr(pipe, component, quantized)
        images, latents = quality.generate(pipe, prompts, args.seed, **call)
        report = quality.compare(name, images, latents, ref_images, ref_latents)
        report.layer_errors = quality.layer_errors(quantized, reference, stats)
        reports.append(report)
        setattr(pipe, component, reference)
    print(f"{len(prompts)} prompts, {call['num_inference_steps']} steps, seed {args.seed}, rank {args.rank}")
    print(quality.format_report(reports))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in reports], indent=1))
    return 0
