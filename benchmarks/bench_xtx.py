"""XᵀX for GPTQ (``calibration.hessian.input_moment``) at FLUX.1's input widths: bf16 rows vs the same rows in float32.

On a GPU, bf16 rows take the tensor-core path (the 16-bit values multiplied with float32 output,
``hessian.tensor_core_moment``) and float32 rows the float32 matmul; on a CPU both are float32 matmuls over
128-row chunks (bf16 upcast first). One call's rows (4,096 image + 512 text tokens of FLUX.1 at 1024²) into a
running sum, as the calibration hooks do; the sum is the packed upper triangle (``calibration/packed.py``), and
TFLOP/s counts the 2·rows·packed entries it computes (about rows·K²). Also the int64 fixed-point conversion of one
sum (``FixedPointSum.add``, ``hessian_sum="fixed"``: ``ops.fixed_point_add``'s kernel) against the torch chain of
``reference.fixed_point_add`` it replaced, same process, same sums, with the bytes per entry the kernel moves (20)
as GB/s. The projection in ``bench_calibration.py`` assumes 400 TFLOP/s for the bf16 path on a GPU and the kernel's
conversion rate measured here: this is where those get measured.

    python benchmarks/bench_xtx.py [--rows 4608] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusers_svdquant import reference
from diffusers_svdquant.calibration.fixedpoint import FixedPointSum
from diffusers_svdquant.calibration.hessian import input_moment, tensor_core_moment
from diffusers_svdquant.calibration.packed import packed_size

WIDTHS = [3072, 12288, 15360]  # FLUX.1's linear input widths: attention / MLP in, MLP out, single-block out


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of ``fn()`` after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096 + 512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{where}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'K':>6} {'rows':>5} | {'bf16 ms':>8} {'TFLOP/s':>8} {'path':>12} | {'fp32 ms':>8} {'TFLOP/s':>8} | "
          f"{'ratio':>6} | {'to int64 ms':>11} {'ns/entry':>8} {'GB/s':>6} {'torch chain ns':>14} "
          f"{'ratio':>6}")  # fmt: skip
    for k in WIDTHS:
        x16 = torch.randn(args.rows, k, device=device).to(torch.bfloat16)
        x32 = x16.float()
        acc = torch.zeros(packed_size(k), device=device)
        flops = 2 * args.rows * packed_size(k)
        t16 = timed(lambda x=x16, a=acc: input_moment(x, a), args.repeats, sync)
        t32 = timed(lambda x=x32, a=acc: input_moment(x, a), args.repeats, sync)
        fixed = FixedPointSum.from_statistics(x32.abs().amax(0).cpu(), 1 << 24)
        tconv = timed(lambda f=fixed, a=acc: f.add(0, a), max(1, args.repeats // 2), sync)
        ints, shifts = torch.zeros_like(acc, dtype=torch.int64), fixed.exponents.to(device)
        tref = timed(lambda i=ints, a=acc, e=shifts, o=fixed.offset: reference.fixed_point_add(i, a, e, o),
                     max(1, args.repeats // 2), sync)  # fmt: skip
        path = "tensor cores" if tensor_core_moment(x16) else "fp32 upcast"
        per_entry, ref_entry = tconv / packed_size(k) * 1e9, tref / packed_size(k) * 1e9
        print(f"{k:>6} {args.rows:>5} | {t16 * 1e3:>8.2f} {flops / t16 / 1e12:>8.1f} {path:>12} | {t32 * 1e3:>8.2f} "
              f"{flops / t32 / 1e12:>8.1f} | {t32 / t16:>5.2f}x | {tconv * 1e3:>11.1f} {per_entry:>8.2f} "
              f"{20 / per_entry:>6.1f} {ref_entry:>14.2f} {ref_entry / per_entry:>5.1f}x",
              flush=True)  # fmt: skip
        del x16, x32, acc, fixed, ints


if __name__ == "__main__":
    main()
