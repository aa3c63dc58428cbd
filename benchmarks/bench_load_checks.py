"""What the load-time integrity check costs: loading the FLUX-shaped demo model, with and without it.

    python benchmarks/bench_load_checks.py [--blocks 1,1] [--repeats 5]

Saves a FLUX.1-shaped transformer (real layer sizes) quantized in bf16, then times, in one process,
``from_pretrained`` of the saved checkpoint (which maps the file: the data is read later, by the
first forward or a ``.to(device)``), reading every tensor once (what that first use costs), and the
check itself (``integrations.layers.check_finite``, warm, on the loaded model). Prints the check's
share of the mapped load and of the load plus the first read. The issue's bound is 2%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from diffusers import FluxTransformer2DModel

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear
from diffusers_svdquant.apps.model_zoo import flux_shaped
from diffusers_svdquant.integrations.layers import check_finite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="1,1", help="double,single blocks of the FLUX.1-shaped model")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    double, single = (int(v) for v in args.blocks.split(","))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        flux_shaped(double, single, dtype=torch.bfloat16).save_pretrained(src)
        FluxTransformer2DModel.from_pretrained(
            src, dtype=torch.bfloat16, quantization_config=SVDQuantConfig()
        ).save_pretrained(out)
        loads, reads, checks = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model = FluxTransformer2DModel.from_pretrained(out)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            for t in model.state_dict().values():
                t.clone()
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            check_finite(model)
            checks.append(time.perf_counter() - start)
        layers = sum(isinstance(m, SVDQuantLinear) for m in model.modules())
    load, read, check = (statistics.median(v) for v in (loads, reads, checks))
    print(f"FLUX.1-shaped, {double} double + {single} single blocks, {layers} quantized layers, bf16; "
          f"medians of {args.repeats}")  # fmt: skip
    print(f"from_pretrained (mapped, check included) {load * 1e3:.1f} ms; first read of every tensor "
          f"{read * 1e3:.1f} ms; the check alone {check * 1e3:.2f} ms")  # fmt: skip
    print(
        f"check = {100 * check / load:.2f}% of the mapped load, {100 * check / (load + read):.2f}% of load + first read"
    )


if __name__ == "__main__":
    main()
