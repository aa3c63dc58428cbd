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
    t0 = time.perf_counter()
    stats = calibration.calibrate(
        model, run, config=config, max_samples=args.max_samples, search=False, progress=False, hessian=args.gptq
    )
    t1 = time.perf_counter()
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
    if base["quantize_rtn_s"] is not None:
        extra = base["quantize_s"] - base["quantize_rtn_s"]
        total = base["collect_s"] + base["search_s"] + base["quantize_rtn_s"]
        print(f"\nGPTQ: quantize {base['quantize_s']:.2f} s vs {base['quantize_rtn_s']:.2f} s rounding to nearest "
              f"({extra / base['layers']:.2f} s per layer); collecting XᵀX is inside 'collect'. GPTQ adds "
              f"{100 * extra / total:.0f}% to collect + search + quantize on 1 process")  # fmt: skip

    # Projection: one process's search + quantization seconds per weight byte, split by block kind.
    b = base
    double, single = (int(x) for x in args.blocks.split(","))

    def per_block(seconds: float) -> tuple[float, float]:
        per_byte = seconds / b["all_weight"]
        return (per_byte * b["double_weight"] / max(double, 1),
                per_byte * (b["all_weight"] - b["double_weight"]) / max(single, 1))  # fmt: skip

    def full(seconds: float) -> float:
        d, s = per_block(seconds)
        return d * FLUX1_BLOCKS[0] + s * FLUX1_BLOCKS[1]

    search_d, search_s = per_block(b["search_s"])
    quant_d, quant_s = per_block(b["quantize_s"])
    print(f"\nper block, 1 process: search {search_d:.1f} s (double) / {search_s:.1f} s (single), "
          f"quantize {quant_d:.1f} / {quant_s:.1f} s")  # fmt: skip
    for r in results:
        projected = full(b["search_s"]) * r["search_s"] / b["search_s"] + full(b["quantize_s"])
        print(f"projected full FLUX.1 transformer ({FLUX1_BLOCKS[0]} double + {FLUX1_BLOCKS[1]} single blocks), "
              f"search on {r['processes']} process(es) + quantize: {projected / 60:.1f} min "
              f"(+ the 16-bit forwards of the calibration set)")  # fmt: skip


if __name__ == "__main__":
    main()
