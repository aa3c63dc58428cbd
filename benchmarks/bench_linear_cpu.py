"""The whole fused W4A4 linear on CPU vs torch.nn.functional.linear in bf16 and fp32, same inputs.

W4A4 = activation quantization (smooth, INT4, low-rank down projection) + the INT4 GEMM with the
low-rank and bias epilogue, bf16 in and out, as SVDQuantLinear runs it: one native call on the
canonical weights (the kernel builds its tile layout itself, no resident second copy). Medians of repeated runs
in one process; GOP/s counts 2·M·N·K; the ratio is against the faster torch path on this CPU.
Beside it, the CPU's int8 dot-product peak (a tight vpmaddubsw+vpmaddwd loop in the native module,
``_C.int8_peak_gops``, same thread count) and W4A4 as a % of it.

    python benchmarks/bench_linear_cpu.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from diffusers_svdquant import algorithm, ops

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]
ROWS = [1, 16, 256, 1024, 4096]


def median_time(repeats: int, fn, *args) -> float:
    fn(*args)  # warm-up (allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only (3072, 3072) at M in {1, 256, 4096}")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not ops.native_available():
        raise SystemExit(f"the native kernels are not built: {ops.native_error()}")
    shapes, rows = (SHAPES[:1], [1, 256, 4096]) if args.quick else (SHAPES, ROWS)
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, get_cpu_capability() = "
        f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"svdquant CPU path {ops.cpu_isa()}"
    )
    threads = torch.get_num_threads()
    # Median of a few runs: another process loading a core shows up as an outlier, not the figure.
    peak = statistics.median([ops.int8_peak_gops(threads) for _ in range(5)])
    print(f"int8 peak (vpmaddubsw+vpmaddwd, {threads} threads): {peak:.0f} GOP/s")
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | {'W4A4 GOP/s':>10} {'% peak':>6} {'bf16 GFLOP/s':>12} {'fp32 GFLOP/s':>12} | "
        f"{'vs bf16':>7} {'vs fp32':>7} {'vs best':>7}"
    )
    torch.manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k) / k**0.5
        q = algorithm.quantize_weight(w, 32, dtype=torch.bfloat16)
        w16 = w.to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            x32 = x.float()
            reps = max(2, args.repeats if m * n * k < 2e10 else args.repeats // 2)
            t_q = median_time(
                reps, ops.svdquant_linear, x, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, None
            )
            t_16 = median_time(reps, torch.nn.functional.linear, x, w16)
            t_32 = median_time(reps, torch.nn.functional.linear, x32, w)
            ops_ = 2 * m * n * k / 1e9
            pct = f"{100 * ops_ / t_q / peak:>5.0f}%" if peak else f"{'-':>6}"
            print(
                f"{m:>5} {k:>6} {n:>6} | {ops_ / t_q:>10.0f} {pct} {ops_ / t_16:>12.0f} {ops_ / t_32:>12.0f} | "
                f"{t_16 / t_q:>6.2f}x {t_32 / t_q:>6.2f}x {min(t_16, t_32) / t_q:>6.2f}x"
            )


if __name__ == "__main__":
    main()
