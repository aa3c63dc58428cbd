"""Time the fused ``_C.quantize_act`` (every CPU path this machine supports) against
``reference.quantize_act`` (plain torch) in one process, on the same inputs and thread count.

GB/s counts the bytes of input read once (x, smooth and lora_down); "vs torch" is the
reference's median time divided by the kernel's (higher is better).

    python benchmarks/bench_quantize_act.py [--dtype bf16] [--rank 32] [--min-time 0.5] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from diffusers_svdquant import _C, reference

DTYPES = {"fp32": (torch.float32, 0), "bf16": (torch.bfloat16, 1), "fp16": (torch.float16, 2)}
SHAPES = [(m, k) for m in (1, 256, 4096) for k in (3072, 12288)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_time(fn, min_time: float, min_reps: int = 5, max_reps: int = 200) -> float:
    fn()  # warm-up: page faults, OpenMP pool start, caches
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds timed per cell (>= 5 runs)")
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    args = parser.parse_args()
    dtype, code = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)  # the reference and the kernel use the same count
    threads = torch.get_num_threads()
    isas = list(_C.supported_cpu_isas())
    default_isa = _C.cpu_isa()

    print(f"CPU: {cpu_model()}  ({platform.machine()})")
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, torch.backends.cpu.get_cpu_capability() = {capability}")
    print(f"_C paths: {isas} (default {default_isa}); threads = {threads}; x {args.dtype}, R = {args.rank}")
    print()
    header = f"{'M':>5} {'K':>6} {'impl':>10} {'median ms':>10} {'GB/s':>8} {'vs torch':>9}"
    print(header)
    print("-" * len(header))

    for m, k in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(m, k).to(dtype)
        smooth = torch.empty(k).uniform_(0.5, 4.0).to(dtype)
        lora_down = (torch.randn(k, args.rank) / k**0.5).to(dtype)
        q_x = torch.empty(m, k // 2, dtype=torch.uint8)
        s_x = torch.empty(m, k // reference.GROUP_SIZE, dtype=torch.float32)
        lora_act = torch.empty(m, args.rank, dtype=torch.float32)
        nbytes = (x.numel() + smooth.numel() + lora_down.numel()) * x.element_size()
        ptrs = [t.data_ptr() for t in (x, smooth, lora_down, q_x, s_x, lora_act)]

        t_ref = median_time(lambda: reference.quantize_act(x, smooth, lora_down), args.min_time)  # noqa: B023
        rows = [("torch ref", t_ref)]
        for isa in isas:
            _C.set_cpu_isa(isa)

            def native():
                _C.quantize_act(*ptrs, m, k, args.rank, code, reference.GROUP_SIZE, threads)  # noqa: B023

            rows.append((isa, median_time(native, args.min_time)))
        _C.set_cpu_isa(default_isa)
        for name, t in rows:
            print(f"{m:>5} {k:>6} {name:>10} {t * 1e3:>10.3f} {nbytes / t / 1e9:>8.2f} {t_ref / t:>8.1f}x")
        print()


if __name__ == "__main__":
    main()
