"""The whole fused W4A4 linear on CPU vs torch.nn.functional.linear in bf16 and fp32, same inputs.

W4A4 = activation quantization (smooth, INT4, low-rank down projection) + the INT4 GEMM with the
low-rank and bias epilogue, bf16 in and out, as SVDQuantLinear runs it: one native call on the
canonical weights (the kernel builds its tile layout itself, no resident second copy). Medians of repeated runs
in one process, the three calls timed in turn within each repeat; GOP/s counts 2·M·N·K; the ratio is against
the faster torch path on this CPU. Beside it, W4A4 as a % of the CPU's int8 dot-product peak (the GEMM's own
inner instruction in a tight loop in the native module, ``_C.int8_peak_gops``, same thread count), that
loop run in turn with the row's calls too, so that both sides of the % see the same moments of a shared CPU.

    python benchmarks/bench_linear_cpu.py [--quick] [--repeats 5] [--torchao]

``--torchao`` adds the peer a user would try instead: torchao's CPU int8 paths
(``Int8DynamicActivationInt8WeightConfig``, ``Int8WeightOnlyConfig``), each timed in bf16 and fp32 and
the faster kept, on the same shapes. torchao is not a dependency: ``pip install torchao`` first
(``torch==2.13.0`` stays pinned).
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


def interleaved_medians(repeats: int, *calls: tuple, probe=None) -> tuple[list[float], float | None]:
    """Median seconds of each ``(fn, *args)`` call, timed in turn within every repeat, and the median of
    ``probe()`` (a rate it measures itself, e.g. the int8 peak loop) sampled in the same turns.

    Round-robin rather than one call's repeats after the other's: a neighbour loading the (shared,
    virtual) CPU for a few seconds then slows every call of that round alike instead of one side
    of the ratio."""
    for fn, *args in calls:
        fn(*args)  # warm-up (allocator)
    times: list[list[float]] = [[] for _ in calls]
    probes: list[float] = []
    for _ in range(repeats):
        for i, (fn, *args) in enumerate(calls):
            start = time.perf_counter()
            fn(*args)
            times[i].append(time.perf_counter() - start)
        if probe is not None:
            probes.append(probe())
    return [statistics.median(t) for t in times], (statistics.median(probes) if probes else None)


def timed(fn, *args, repeats: int) -> float:
    """Median seconds; a call slower than 5 s is timed once (torch's fallback int8 paths can be that slow)."""
    start = time.perf_counter()
    fn(*args)
    first = time.perf_counter() - start
    return first if first > 5 else median_time(repeats, fn, *args)


def torchao_linears(w: torch.Tensor) -> dict[str, dict[torch.dtype, torch.nn.Module]]:
    """torchao's int8 CPU paths for weight ``w`` ``[N, K]``, per input dtype."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    out: dict[str, dict[torch.dtype, torch.nn.Module]] = {}
    for name, config in (
        ("torchao W8A8-dyn", Int8DynamicActivationInt8WeightConfig),
        ("torchao int8-WO", Int8WeightOnlyConfig),
    ):
        out[name] = {}
        for dtype in (torch.bfloat16, torch.float32):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
            quantize_(lin, config())
            out[name][dtype] = lin
    return out


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
    p.add_argument("--torchao", action="store_true", help="also time torchao's CPU int8 paths (pip install torchao)")
    args = p.parse_args()
    if args.torchao:
        try:
            import torchao
        except ImportError as e:
            raise SystemExit("--torchao needs torchao: pip install torchao") from e
        print(f"torchao {torchao.__version__}")
    if not ops.native_available():
        raise SystemExit(f"the native kernels are not built: {ops.native_error()}")
    shapes, rows = (SHAPES[:1], [1, 256, 4096]) if args.quick else (SHAPES, ROWS)
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, get_cpu_capability() = "
        f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"svdquant CPU path {ops.cpu_isa()}"
    )
    threads = torch.get_num_threads()
    peak = max(ops.int8_peak_gops(threads) for _ in range(7))
    isa = str(ops.cpu_isa())
    loops = {"i8mm": "smmla", "dotprod": "sdot", "generic": "sdot" if "dotprod" in ops.supported_cpu_isas() else ""}
    loop = loops.get(isa) or ("vpdpbusd" if "vnni" in isa else "vpmaddubsw+vpmaddwd")
    print(
        f"int8 peak ({loop} loop, {threads} threads): best of 7 runs {peak:.0f} GOP/s; each row's % is of the "
        "loop's median over that row's repeats, run in turn with its calls (the same conditions)"
    )
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | {'W4A4 GOP/s':>10} {'% peak':>6} {'bf16 GFLOP/s':>12} {'fp32 GFLOP/s':>12} | "
        f"{'vs bf16':>7} {'vs fp32':>7} {'vs best':>7} | row's peak GOP/s"
    )
    torch.manual_seed(0)
    peer_rows: list = []
    for k, n in shapes:
        w = torch.randn(n, k) / k**0.5
        q = algorithm.quantize_weight(w, 32, dtype=torch.bfloat16)
        w16 = w.to(torch.bfloat16)
        peers = torchao_linears(w) if args.torchao else {}
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            x32 = x.float()
            reps = max(5, args.repeats)  # medians of 3 still moved by a single burst of the VM
            (t_q, t_16, t_32), row_peak = interleaved_medians(
                reps,
                (ops.svdquant_linear, x, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, None),
                (torch.nn.functional.linear, x, w16),
                (torch.nn.functional.linear, x32, w),
                probe=(lambda: ops.int8_peak_gops(threads)) if peak else None,
            )
            ops_ = 2 * m * n * k / 1e9
            pct = f"{100 * ops_ / t_q / row_peak:>5.0f}%" if row_peak else f"{'-':>6}"
            print(
                f"{m:>5} {k:>6} {n:>6} | {ops_ / t_q:>10.0f} {pct} {ops_ / t_16:>12.0f} {ops_ / t_32:>12.0f} | "
                f"{t_16 / t_q:>6.2f}x {t_32 / t_q:>6.2f}x {min(t_16, t_32) / t_q:>6.2f}x"
                + (f" | peak {row_peak:.0f}" if row_peak else "")
            )
            if args.torchao:
                peer_rows.append((m, k, n, t_q, x, x32, peers))

    if args.torchao:
        print("\ntorchao's CPU int8 paths (the faster of bf16 / fp32 input each) vs W4A4:")
        names = ["torchao W8A8-dyn", "torchao int8-WO"]
        print(f"{'M':>5} {'K':>6} {'N':>6} | " + " ".join(f"{n + ' GOP/s':>22}" for n in names) + " | W4A4 vs each")
        with torch.no_grad():
            for m, k, n, t_q, x, x32, peers in peer_rows:
                inputs = ((torch.bfloat16, x), (torch.float32, x32))
                times = [min(timed(peers[nm][dt], xi, repeats=3) for dt, xi in inputs) for nm in names]
                ops_ = 2 * m * n * k / 1e9
                print(f"{m:>5} {k:>6} {n:>6} | " + " ".join(f"{ops_ / t:>22.1f}" for t in times) + " | "
                      + " ".join(f"{t / t_q:>6.1f}x" for t in times))  # fmt: skip


if __name__ == "__main__":
    main()
