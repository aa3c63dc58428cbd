"""Time calibration + quantization of FLUX.1-shaped blocks, and how it scales with processes.

The model has FLUX.1's real layer sizes (3072 wide, MLP 12288, single-block output 15360) with a
few blocks and random weights. A "denoising call" is one forward with random latents / text at a
new timestep. Three phases are timed on each process count:

* collect: the 16-bit forwards with the statistics hooks (calls split between processes),
* search: the per-layer (alpha, beta) grid search (layers split between processes),
* quantize: SVDQuant of every target layer with the searched smoothing (one process, as
  ``from_pretrained`` does it); with ``--gptq`` the statistics also carry each layer's XᵀX and the
  residual is rounded with GPTQ, timed beside round-to-nearest on the same statistics.

Peak memory is the process's maximum resident set (``ru_maxrss``).

Then the per-layer seconds of one double and one single block project the search + quantization
time of the full FLUX.1 transformer (19 double + 38 single blocks).

With ``--gptq --hessian-passes 1,4`` the collection is also run with XᵀX gathered in 4 passes (one group of
layers per pass, its sums written to disk before the next: ``calibrate(hessian_passes=...)``), each pass count
in a fresh process so that its peak RSS is its own; ``--collect-only`` stops after the collection. The
projection then gives, for each memory budget of ``--budgets-gib``, the passes the whole FLUX.1 needs
(``calibration.passes.plan_passes`` on its real layer list and the summation tree's partial sums for
``--project-prompts`` prompts per process) and the collection time that many passes take on this machine.
The GPU line is an ESTIMATE from FLOPs at a stated throughput (``--gpu-tflops``), not a measurement. The XᵀX
is projected as calibrate gathers it: layers that read one input tensor (q / k / v, a single block's proj_mlp)
hold one sum, and each sum costs the rows its layers see, read off this run by layer kind (image tokens, text
tokens, or one row per call for the AdaLN linears) and scaled to ``--project-tokens`` / ``--project-text-tokens``.

    python benchmarks/bench_calibration.py [--blocks 1,1] [--calls 4] [--processes 1,2] [--gptq]
        [--hessian-passes 1,4] [--collect-only] [--budgets-gib 24,80]
        [--project-prompts 128 --project-steps 8 --project-tokens 4608 --project-text-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

from calibration_projection import FLUX1_BLOCKS, kind, pass_projection  # this folder's


def worker(args: argparse.Namespace) -> None:
    """One process of a (possibly distributed) run; rank 0 prints a JSON line of timings."""
    import torch

    from diffusers_svdquant import SVDQuantConfig, algorithm, calibration, quantize_
    from diffusers_svdquant.apps.model_zoo import flux_shaped
    from diffusers_svdquant.calibration.processes import Processes
    from diffusers_svdquant.denoisers import model_inputs, timestep_value

    procs = Processes()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs.world))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    double, single = (int(b) for b in args.blocks.split(","))
    model = flux_shaped(double, single, dtype=dtype).eval()
    config = SVDQuantConfig(rank=args.rank)
    calls = [model_inputs(model, args.image_tokens, args.text_tokens, seed=c) for c in range(args.calls)]

    def run(m: torch.nn.Module) -> None:
        for c in range(procs.rank, args.calls, procs.world):  # this process's share of the calls
            t = 1.0 - c / max(args.calls, 1)
            m(**calls[c], timestep=timestep_value(m, t), return_dict=False)

    per_layer: dict[str, float] = {}
    search_layer = algorithm.search_smoothing

    def timed_search(weight, *a, **kw):  # per-layer timing without touching the library
        start = time.perf_counter()
        out = search_layer(weight, *a, **kw)
        per_layer[f"{tuple(weight.shape)}#{len(per_layer)}"] = time.perf_counter() - start
        return out

    algorithm.search_smoothing = timed_search
    plain_s = None
    if args.gptq:  # the same collection without XᵀX: what gathering it costs
        start = time.perf_counter()
        calibration.calibrate(model, run, config=config, max_samples=args.max_samples, search=False, progress=False)
        plain_s = time.perf_counter() - start
    before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    passes = int(args.hessian_passes) if args.gptq else None
    t0 = time.perf_counter()
    stats = calibration.calibrate(
        model, run, config=config, max_samples=args.max_samples, search=False, progress=False, hessian=args.gptq,
        hessian_passes=passes,
    )  # fmt: skip
    t1 = time.perf_counter()
    collect_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recorded = len(stats.act_absmax)
    # The sums one pass held: the largest group's (run= is one item per process: one K x K per layer), a sum that
    # layers share (they read one input tensor: attention's q / k / v) once.
    from diffusers_svdquant.calibration.packed import packed_size
    from diffusers_svdquant.calibration.passes import moment_bytes, plan_passes

    shared = stats.hessian_shared()  # layer -> the layer whose XᵀX it holds
    sizes = [(n, moment_bytes(int(stats.act_absmax[n].numel()), 1)) for n in stats.hessian_names()]
    groups = plan_passes(sizes, passes=passes, together=shared) if args.gptq else []
    held = max((sum(dict(sizes)[n] for n in g if n not in shared) for g in groups), default=0)
    shapes_rec = stats.info["layers"]  # name -> [N, K] of every recorded layer
    sets: dict[str, list[str]] = {}
    for name, first in shared.items():
        sets.setdefault(first, [first]).append(name)
    collect = {
        "tokens_per_call": args.image_tokens + args.text_tokens,
        "rec_weight": sum(n * k for n, k in shapes_rec.values()),
        "rec_double_weight": sum(n * k for name, (n, k) in shapes_rec.items() if name.startswith("transformer_")),
        # The XᵀX work measured: the packed upper triangle's entries (about K²/2) x the rows each sum saw (a shared
        # sum once).
        "rec_xtx_work": sum(
            packed_size(k) * stats.num_tokens[n] for n, (_, k) in shapes_rec.items() if n not in shared
        ),
        # What the projection scales to FLUX.1, by layer kind ("transformer_blocks.*.attn.to_q"): the rows one
        # denoiser call feeds each kind, and the kinds that share one sum.
        "rows_per_call": {kind(n): stats.num_tokens[n] / args.calls for n in shapes_rec},
        "shared_kinds": sorted({tuple(sorted(kind(n) for n in s)) for s in sets.values()}),
        "processes": procs.world,
        "hessian_passes": len(groups),
        "recorded_layers": recorded,
        "collect_s": t1 - t0,
        "collect_plain_s": plain_s,
        "before_collect_peak_rss_mib": before_peak,
        "collect_peak_rss_mib": collect_peak,
        "hessian_mib": sum(b for n, b in sizes if n not in shared) / 2**20,
        "hessian_held_mib": held / 2**20,
    }
    if args.collect_only:
        if procs.rank == 0:
            print("RESULT " + json.dumps(collect), flush=True)
        return
    calibration.search_smoothing(model, stats, config, procs=procs, progress=False)
    t2 = time.perf_counter()
    search_times = procs.gather(per_layer)
    if procs.rank != 0:
        return
    layers = len(stats.smoothing)
    names = list(stats.smoothing)
    rtn_s = None
    if args.gptq:  # the same statistics without GPTQ, on a copy, for the comparison
        import copy

        start = time.perf_counter()
        quantize_(copy.deepcopy(model), SVDQuantConfig(rank=args.rank, calibration=stats, gptq=False))
        rtn_s = time.perf_counter() - start
    t3 = time.perf_counter()
    quantize_(model, SVDQuantConfig(rank=args.rank, calibration=stats))
    t4 = time.perf_counter()
    # Per-block seconds for the projection: search (all ranks' layers, summed = one process's work) and
    # quantization apportioned by weight size.
    shapes = {n: tuple(model.get_submodule(n).qweight.shape) for n in names}
    print(
        "RESULT "
        + json.dumps(
            collect
            | {
                "threads": torch.get_num_threads(),
                "layers": layers,
                "search_s": t2 - t1,
                "search_cpu_s": sum(sum(d.values()) for d in search_times),
                "quantize_s": t4 - t3,
                "quantize_rtn_s": rtn_s,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "double_layers": sum(n.startswith("transformer_blocks.") for n in names),
                "single_layers": sum(n.startswith("single_transformer_blocks.") for n in names),
                "double_weight": sum(s[0] * s[1] * 2 for n, s in shapes.items() if n.startswith("transformer_")),
                "all_weight": sum(s[0] * s[1] * 2 for s in shapes.values()),
            }
        ),
        flush=True,
    )


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _strip(argv: list[str], *options: str) -> list[str]:
    """``argv`` without ``options`` and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not any(a.startswith(o + "=") for o in options):
            out.append(a)
    return out


def _launch(n: int, forwarded: list[str]) -> dict:
    """One run of ``n`` processes (torchrun); rank 0's RESULT line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", _free_port(),
           os.path.abspath(__file__), *forwarded, "--worker"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{n} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]) | {"wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="1,1", help="double,single FLUX.1-shaped blocks")
    p.add_argument("--calls", type=int, default=4, help="denoiser calls (prompts x steps) to calibrate on")
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--max-samples", type=int, default=128)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 is emulated on CPUs without AVX-512 BF16: fp32 is the fast path there")  # fmt: skip
    p.add_argument("--processes", default="1,2", help="process counts to compare")
    p.add_argument("--gptq", action="store_true", help="gather XᵀX too and round the residual with GPTQ")
    p.add_argument("--hessian-passes", default="1", help="with --gptq: XᵀX pass counts to compare (the first on "
                   "every process count, the others on the first process count)")  # fmt: skip
    p.add_argument("--collect-only", action="store_true", help="time the collection only (no search, no quantize)")
    p.add_argument("--budgets-gib", default="24,80,100", help="projection: XᵀX memory budgets per process, GiB "
                   "(100: what an H200's 131 GiB leaves beside FLUX.1's 22 GiB of bf16 weights and the "
                   "activations)")  # fmt: skip
    p.add_argument("--project-xtx-prompts", default="128,32", help="projection: prompts XᵀX is gathered over "
                   "(calibrate's hessian_prompts), each a table")  # fmt: skip
    p.add_argument("--project-rows-per-column", default="all,64", help="projection: fixed point keeping calls for "
                   "about this many XᵀX rows per input column (calibrate's hessian_rows_per_column; 'all': every "
                   "call), each a table")  # fmt: skip
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="GPU ESTIMATE: bf16 forward throughput, TFLOP/s "
                   "(an H100 SXM's 989 dense at 40%%)")  # fmt: skip
    p.add_argument("--gpu-fp32-tflops", type=float, default=50.0, help="GPU ESTIMATE: float32 XᵀX throughput, "
                   "TFLOP/s (an H100 SXM's 67 at 75%%)")  # fmt: skip
    p.add_argument(
        "--gpu-tbps",
        type=float,
        default=2.5,
        help="GPU ESTIMATE: memory bandwidth for the fixed-point "
        "conversion (ops.fixed_point_add: 20 bytes per packed entry), TB/s (an H100 SXM's 3.35 at 75%%)",
    )
    p.add_argument("--project-prompts", type=int, default=128, help="projection: calibration prompts (the reference "
                   "toolkit's 128)")  # fmt: skip
    p.add_argument("--project-steps", type=int, default=8, help="projection: denoising steps per prompt (calibrate's)")
    p.add_argument("--project-tokens", type=int, default=4096 + 512, help="projection: tokens per call (1024² + T5)")
    p.add_argument("--project-text-tokens", type=int, default=512, help="projection: of those, T5 text tokens "
                   "(FLUX.1-dev's 512)")  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores; FLUX.1-shaped blocks {args.blocks}, {args.calls} calls of "
          f"{args.image_tokens}+{args.text_tokens} tokens, rank {args.rank}, {args.max_samples} rows/layer, "
          f"{args.dtype}; load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    passes = [int(x) for x in args.hessian_passes.split(",")]
    if max(passes) > 1 and not args.gptq:
        sys.exit("bench_calibration: --hessian-passes above 1 needs --gptq")
    forwarded = _strip(sys.argv[1:], "--processes", "--hessian-passes")
    counts = [int(x) for x in args.processes.split(",")]
    results = [_launch(n, [*forwarded, "--hessian-passes", str(passes[0])]) for n in counts]
    pass_runs = [results[0]] + [_launch(counts[0], [*forwarded, "--hessian-passes", str(v)]) for v in passes[1:]]
    b = results[0]
    if args.gptq:
        _pass_table(pass_runs)
    if not args.collect_only:
        _full_report(args, results)
    if args.gptq:
        pass_projection(args, b, pass_runs)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def _pass_table(runs: list[dict]) -> None:
    """Collection with XᵀX in 1 vs N passes: seconds, seconds per layer, the sums held, peak RSS."""
    print(f"\n{'procs':>5} {'passes':>6} {'layers':>6} {'collect s':>10} {'s/layer':>8} {'XᵀX MiB':>8} "
          f"{'held MiB':>9} {'RSS before MiB':>14} {'peak RSS MiB':>12} {'peak - before':>13}")  # fmt: skip
    for r in runs:
        print(f"{r['processes']:>5} {r['hessian_passes']:>6} {r['recorded_layers']:>6} {r['collect_s']:>10.2f} "
              f"{r['collect_s'] / r['recorded_layers']:>8.2f} {r['hessian_mib']:>8.0f} {r['hessian_held_mib']:>9.0f} "
              f"{r['before_collect_peak_rss_mib']:>14.0f} {r['collect_peak_rss_mib']:>12.0f} "
              f"{r['collect_peak_rss_mib'] - r['before_collect_peak_rss_mib']:>13.0f}")  # fmt: skip


def _full_report(args: argparse.Namespace, results: list[dict]) -> None:
    """The search / quantize table and the time projection of the full FLUX.1 transformer."""
    base = b = results[0]
    print(f"\n{'procs':>5} {'threads':>7} {'layers':>6} {'collect s':>10} {'search s':>9} {'s/layer':>8} "
          f"{'quantize s':>10} {'search speed-up':>15} {'peak MiB':>9}")  # fmt: skip
    for r in results:
        print(f"{r['processes']:>5} {r['threads']:>7} {r['layers']:>6} {r['collect_s']:>10.2f} {r['search_s']:>9.2f} "
              f"{r['search_s'] / r['layers']:>8.2f} {r['quantize_s']:>10.2f} "
              f"{base['search_s'] / r['search_s']:>14.2f}x {r['peak_rss_mib']:>9.0f}")  # fmt: skip
    print(f"\npeak RSS after collecting: {b['collect_peak_rss_mib']:.0f} MiB (XᵀX sums: {b['hessian_mib']:.0f} MiB)")
    gptq_s = 0.0
    if b["quantize_rtn_s"] is not None:
        gptq_s = b["quantize_s"] - b["quantize_rtn_s"]
        xtx_s = b["collect_s"] - b["collect_plain_s"]
        print(f"per layer, 1 process: statistics {b['collect_plain_s'] / b['layers']:.2f} s + XᵀX "
              f"{xtx_s / b['layers']:.2f} s, search {b['search_s'] / b['layers']:.2f} s, quantize "
              f"{b['quantize_rtn_s'] / b['layers']:.2f} s + GPTQ {gptq_s / b['layers']:.2f} s")  # fmt: skip
        rest = b["collect_plain_s"] + b["search_s"] + b["quantize_rtn_s"]
        print(
            f"GPTQ: quantize {b['quantize_s']:.2f} s vs {b['quantize_rtn_s']:.2f} s rounding to nearest; on this "
            f"workload GPTQ + XᵀX add {100 * (gptq_s + xtx_s) / rest:.0f}% to collect + search + quantize"
        )

    # Projection. Search, quantization and GPTQ are per layer: one process's seconds per weight byte, split by
    # block kind, times FLUX.1's blocks. Collection is the 16-bit forwards (plus XᵀX): its seconds per token
    # per weight byte, times the workload's tokens (prompts x steps x tokens per call) and FLUX.1's weights.
    double, single = (int(x) for x in args.blocks.split(","))

    def full(seconds: float) -> float:
        per_byte = seconds / b["all_weight"]
        d = per_byte * b["double_weight"] / max(double, 1)
        s_ = per_byte * (b["all_weight"] - b["double_weight"]) / max(single, 1)
        return d * FLUX1_BLOCKS[0] + s_ * FLUX1_BLOCKS[1]

    tokens = args.project_prompts * args.project_steps * args.project_tokens
    bench_tokens = args.calls * b["tokens_per_call"]
    collect_full = full(b["collect_s"]) * tokens / bench_tokens
    print(f"\nprojected full FLUX.1 transformer ({FLUX1_BLOCKS[0]} double + {FLUX1_BLOCKS[1]} single blocks), "
          f"{args.project_prompts} prompts x {args.project_steps} steps x {args.project_tokens} tokens "
          f"(collection scaled by tokens from {bench_tokens} measured), on this machine:")  # fmt: skip
    for r in results:
        collect = collect_full * r["collect_s"] / b["collect_s"]  # the calls split between processes
        search = full(b["search_s"]) * r["search_s"] / b["search_s"]
        quant = full(b["quantize_s"])  # one process, as from_pretrained does it
        total = collect + search + quant
        line = (f"  {r['processes']} process(es): collect {collect / 3600:.1f} h + search {search / 60:.1f} min + "
                f"quantize {quant / 60:.1f} min = {total / 3600:.1f} h")  # fmt: skip
        if gptq_s:
            g = full(gptq_s)
            line += f"; GPTQ {g / 60:.1f} min = {100 * g / (total - g):.1f}% of the rest"
        print(line)
    # More processes than measured: the calls and the searched layers split evenly (the ideal the measured
    # runs approach: the statistics merge in well under a second), quantization on one process.
    for n in (8, 64):
        collect, search = collect_full / n, full(b["search_s"]) / n
        quant = full(b["quantize_s"])
        print(f"  {n} processes if collect and search split evenly: {(collect + search + quant) / 3600:.1f} h "
              f"(collect {collect / 3600:.1f} h, quantize {quant / 60:.1f} min on one)")  # fmt: skip


if __name__ == "__main__":
    main()
