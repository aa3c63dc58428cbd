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

    python benchmarks/bench_calibration.py [--blocks 1,1] [--calls 4] [--processes 1,2] [--gptq]
        [--project-prompts 128 --project-steps 8 --project-tokens 4608]
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

FLUX1_BLOCKS = (19, 38)


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
    t0 = time.perf_counter()
    stats = calibration.calibrate(
        model, run, config=config, max_samples=args.max_samples, search=False, progress=False, hessian=args.gptq
    )
    t1 = time.perf_counter()
    collect_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
            {
                "processes": procs.world,
                "threads": torch.get_num_threads(),
                "layers": layers,
                "collect_s": t1 - t0,
                "collect_plain_s": plain_s,
                "search_s": t2 - t1,
                "search_cpu_s": sum(sum(d.values()) for d in search_times),
                "quantize_s": t4 - t3,
                "quantize_rtn_s": rtn_s,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "collect_peak_rss_mib": collect_peak,
                "hessian_mib": sum(h.numel() * 4 for h in stats.hessian.values()) / 2**20,
                "tokens_per_call": args.image_tokens + args.text_tokens,
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
    p.add_argument("--project-prompts", type=int, default=128, help="projection: calibration prompts (the reference "
                   "toolkit's 128)")  # fmt: skip
    p.add_argument("--project-steps", type=int, default=8, help="projection: denoising steps per prompt (calibrate's)")
    p.add_argument("--project-tokens", type=int, default=4096 + 512, help="projection: tokens per call (1024² + T5)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores; FLUX.1-shaped blocks {args.blocks}, {args.calls} calls of "
          f"{args.image_tokens}+{args.text_tokens} tokens, rank {args.rank}, {args.max_samples} rows/layer, "
          f"{args.dtype}")  # fmt: skip
    forwarded = [a for a in sys.argv[1:] if not a.startswith("--processes")]
    if "--processes" in sys.argv:
        i = sys.argv.index("--processes")
        forwarded = sys.argv[1:i] + sys.argv[i + 2 :]
    results = []
    for n in (int(x) for x in args.processes.split(",")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               _free_port(), os.path.abspath(__file__), *forwarded, "--worker"]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{n} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]) | {"wall_s": time.perf_counter() - start})

    base = results[0]
    print(f"\n{'procs':>5} {'threads':>7} {'layers':>6} {'collect s':>10} {'search s':>9} {'s/layer':>8} "
          f"{'quantize s':>10} {'search speed-up':>15} {'peak MiB':>9}")  # fmt: skip
    for r in results:
        print(f"{r['processes']:>5} {r['threads']:>7} {r['layers']:>6} {r['collect_s']:>10.2f} {r['search_s']:>9.2f} "
              f"{r['search_s'] / r['layers']:>8.2f} {r['quantize_s']:>10.2f} "
              f"{base['search_s'] / r['search_s']:>14.2f}x {r['peak_rss_mib']:>9.0f}")  # fmt: skip
    b = base
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
        collect = collect_full * b["collect_s"] / r["collect_s"]  # the calls split between processes
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
