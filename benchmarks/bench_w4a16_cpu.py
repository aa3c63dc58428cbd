"""The weight-only INT4 linear (W4A16) on CPU vs torch.nn.functional.linear in bf16 and fp32, same process.

A ``W4A16Linear`` layer's forward on bf16 input (rank-32 low-rank branch, bias), as a bf16 model runs it
(``torch.no_grad``; eager on CPU it calls ``ops.weight_only.linear_w4a16_cpu``, the op's CPU implementation
without its dispatch; the ``path`` column is ``weight_only.cpu_regime``): few rows one native call that streams
the 4-bit weights (``gemv``; for bf16 on every x86 CPU path but generic ``gemv_bf16``, x̂ in 16-bit fixed point
and integer products), more rows the tile kernel on the amx (AMX-BF16) and avx512bf16 (zmm ``vdpbf16ps``) CPU
paths (``tiles``), where torch's bf16 GEMM is emulated the same fixed point register-blocked over rows on the
avxvnni and AVX-512 paths (``gemm_bf16``), else natively dequantized panels through torch.mm (``panels``).
Against it the dense layer it
replaces, ``F.linear`` with bf16 and with fp32 weights on the same shapes; the ratio is against the faster of the
two.
FLUX.1's shapes: the AdaLN modulation (3072 → 18432, M = batch) and the MLP (3072 → 12288, 12288 → 3072).
Medians of repeated runs, the three calls timed in turn within each repeat (a neighbour loading the shared CPU
slows a whole round alike rather than one side of a ratio); the load average is printed with the results.

    python benchmarks/bench_w4a16_cpu.py [--repeats 7] [--rows 1 4 16 256] [--sweep] [--cold]

``--sweep``: rows 1 .. 2048 (ROWS_SWEEP) against bf16 ``F.linear`` only where this CPU has bf16 dot products
(``weight_only.bf16_in_hardware()``; fp32 is the slower one from a few rows there); elsewhere against both up to
64 rows, then fp32 only (torch's bf16 GEMM is emulated there, 10-100x slower).

To measure the CPU classes without bfloat16 dot products on one with them, cap both libraries, e.g. AVX2 + VNNI
(Alder Lake, Zen 3 class with VNNI) and AVX-512 VNNI (Ice Lake, Cascade Lake):

    SVDQ_CPU_ISA=avxvnni ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2_VNNI python benchmarks/bench_w4a16_cpu.py
    SVDQ_CPU_ISA=avx512vnni ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/bench_w4a16_cpu.py

``--cold``: before every timed call, read a buffer of ``--cold-mib`` (default 1,536 MiB: 3x the 480 MiB L3 of the
AMX Xeon VMs, 48x the 32 MiB of the Zen 5 ones), so that each call streams its weights from memory: what a layer
of a whole model meets, whose other layers' weights pass through the caches between two of its calls. Warm (the
default), torch's bf16 weights (75–113 MB) may stay in a large L3 between repeats, which the 4-bit weights' 21–32
MB need less.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from diffusers_svdquant import W4A16Linear, algorithm, ops, reference
from diffusers_svdquant.ops import weight_only

SHAPES = [(3072, 18432), (3072, 12288), (12288, 3072)]  # (K, N): AdaLN, MLP up, MLP down
ROWS = [1, 4, 16, 256]
ROWS_SWEEP = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048]
RANK = 32
# Rows up to which --sweep also times bf16 F.linear where torch's bf16 GEMM is emulated: its GEMV is still the faster
# one at a few rows (Zen 5, oneDNN capped at AVX2_VNNI: 3.3 ms against 11.0 for fp32 at 1 row of 3072 -> 18432).
SWEEP_EMULATED_BF16_ROWS = 64


def interleaved_medians(repeats: int, *calls: tuple, flush=None) -> list[float]:
    """Median seconds of each ``(fn, *args)``, timed in turn within every repeat; ``flush()`` (untimed) before each
    timed call."""
    for fn, *args in calls:
        fn(*args)  # warm-up (allocator, oneDNN primitive cache)
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (fn, *args) in enumerate(calls):
            if flush is not None:
                flush()
            start = time.perf_counter()
            fn(*args)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def w4a16_layer(w: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> W4A16Linear:
    """A W4A16 layer of weight ``w`` [N, K] (reference.quantize_groups_affine), random smoothing and low rank."""
    n, k = w.shape
    codes, wscales, wmins = reference.quantize_groups_affine(w, param_dtype=dtype)
    smooth = torch.empty(k).uniform_(0.5, 2.0).to(dtype)
    lora_down = (torch.randn(k, RANK) / k**0.5).to(dtype)
    lora_up = (torch.randn(n, RANK) * 0.01).to(dtype)
    layer = W4A16Linear(k, n, RANK, True, dtype)
    q = algorithm.QuantizedWeight(reference.pack_int4(codes), wscales, smooth, lora_down, lora_up, wmins)
    layer.load_quantized(q, bias.to(dtype))
    return layer


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--sweep", action="store_true", help="rows 1 .. 2048, fewer F.linear timings")
    p.add_argument("--cold", action="store_true", help="read --cold-mib of memory before each timed call")
    p.add_argument("--cold-mib", type=int, default=1536)
    args = p.parse_args()
    flush = None
    if args.cold:
        buffer = torch.ones(args.cold_mib << 18)  # float32: 4 bytes each

        def flush() -> None:
            float(buffer.sum())

    rows = ROWS_SWEEP if args.sweep else args.rows
    if not ops.native_available():
        raise SystemExit(f"the native kernels are not built: {ops.native_error()}")
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, get_cpu_capability() = "
        f"{torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"svdquant CPU path {ops.cpu_isa()}; caches {'flushed before each call' if args.cold else 'warm'}; load "
        f"average before {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'M':>4} {'K':>6} {'N':>6} {'path':>9} | {'W4A16 ms':>9} {'bf16 ms':>8} {'fp32 ms':>8} | "
        f"{'torch best':>10} {'vs best':>7}"
    )
    torch.manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(n, k) / k**0.5
        bias = torch.randn(n) * 0.1
        layer = w4a16_layer(w, bias, torch.bfloat16)
        w16, b16 = w.to(torch.bfloat16), bias.to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            dense = {"bf16": (F.linear, x, w16, b16), "fp32": (F.linear, x.float(), w, bias)}
            if args.sweep and weight_only.bf16_in_hardware():  # fp32 the slower one from a few rows
                dense.pop("fp32")
            elif args.sweep and m > SWEEP_EMULATED_BF16_ROWS:  # bf16 emulated: 10-100x slower than fp32
                dense.pop("bf16")
            times = interleaved_medians(args.repeats, (layer, x), *dense.values(), flush=flush)
            t_q, t = times[0], dict(zip(dense, times[1:], strict=True))
            which = min(t, key=t.get)
            best = t[which]
            path = weight_only.cpu_regime(m, x.dtype)
            bf16, fp32 = (f"{1e3 * t[d]:.2f}" if d in t else "-" for d in ("bf16", "fp32"))
            print(
                f"{m:>4} {k:>6} {n:>6} {path:>9} | {1e3 * t_q:>9.2f} {bf16:>8} {fp32:>8} | "
                f"{which:>10} {best / t_q:>6.2f}x",
                flush=True,
            )
    print(f"load average after {os.getloadavg()[0]:.2f} (2 = both vCPUs busy)")


if __name__ == "__main__":
    main()
