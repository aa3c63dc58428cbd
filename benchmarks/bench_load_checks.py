"""What the load-time integrity check costs: loading the FLUX-shaped demo model, with and without it.

    python benchmarks/bench_load_checks.py [--blocks 1,1] [--repeats 7]

Saves a FLUX.1-shaped transformer (real layer sizes) quantized in bf16, then times, in one process and
alternating, ``from_pretrained`` of the saved checkpoint with the check and with the check switched off.
``from_pretrained`` maps the file and reads no data; the data is read later, by the first forward or a
``.to(device)``, so each load is followed by one read of every tensor (what that first use costs). The
check reads the scales and 16-bit tensors at load (``ops.first_nonfinite``: a native scan of the raw
bits), which moves their first read into the load; its cost is therefore the difference of
(load + first read) with and without it. Also printed: the check alone, warm, and its share of the mapped
load alone. The issue's bound is 2% of the load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from unittest import mock

import torch
from diffusers import FluxTransformer2DModel

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear
from diffusers_svdquant.apps.model_zoo import flux_shaped
from diffusers_svdquant.integrations import diffusers_quantizer
from diffusers_svdquant.integrations.layers import check_finite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="1,1", help="double,single blocks of the FLUX.1-shaped model")
    p.add_argument("--repeats", type=int, default=7)
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
        times: dict[str, list[float]] = {"with": [], "without": [], "mapped": [], "check": []}
        for _ in range(args.repeats):
            for mode in ("with", "without"):
                with mock.patch.object(diffusers_quantizer, "check_finite", check_finite if mode == "with" else _skip):
                    start = time.perf_counter()
                    model = FluxTransformer2DModel.from_pretrained(out)
                    mapped = time.perf_counter() - start
                    for t in model.state_dict().values():
                        t.clone()
                    times[mode].append(time.perf_counter() - start)
                if mode == "with":
                    times["mapped"].append(mapped)
                    start = time.perf_counter()
                    check_finite(model)
                    times["check"].append(time.perf_counter() - start)
                    layers = sum(isinstance(m, SVDQuantLinear) for m in model.modules())
                del model
    med = {k: statistics.median(v) for k, v in times.items()}
    added = med["with"] - med["without"]
    print(f"FLUX.1-shaped, {double} double + {single} single blocks, {layers} quantized layers, bf16; "
          f"medians of {args.repeats}")  # fmt: skip
    print(f"load + first read: {med['without'] * 1e3:.1f} ms without the check, {med['with'] * 1e3:.1f} ms with it "
          f"(mapped from_pretrained alone {med['mapped'] * 1e3:.1f} ms); the check alone, warm, "
          f"{med['check'] * 1e3:.2f} ms")  # fmt: skip
    print(f"check = {100 * added / med['without']:+.2f}% of load + first read (the bound: 2%); the warm check is "
          f"{100 * med['check'] / med['mapped']:.2f}% of the mapped load alone")  # fmt: skip


def _skip(model) -> None:
    """The check switched off."""


if __name__ == "__main__":
    main()
