"""What the load-time integrity check costs: loading the FLUX-shaped demo model and running it once.

    python benchmarks/bench_load_checks.py [--blocks 1,1] [--repeats 7]

Saves a FLUX.1-shaped transformer (real layer sizes) quantized in bf16, then, in one process, times
``from_pretrained`` of the saved checkpoint, the check inside it (``integrations.layers.check_finite``,
timed where the loader calls it: a cold pass over the scales and 16-bit tensors, page faults included),
and what the loaded model's first use costs: one read of every tensor, and one forward of the demo's
inputs (256 image + 64 text tokens). ``from_pretrained`` maps the file and reads no data, so the check is
also printed against the load plus that first use. The issue's bound is 2% of the load.
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
from diffusers.utils import logging

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear
from diffusers_svdquant.apps.model_zoo import flux_shaped
from diffusers_svdquant.denoisers import model_inputs, timestep_value
from diffusers_svdquant.integrations import diffusers_quantizer
from diffusers_svdquant.integrations.layers import check_finite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="1,1", help="double,single blocks of the FLUX.1-shaped model")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable_progress_bar()
    double, single = (int(v) for v in args.blocks.split(","))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    times: dict[str, list[float]] = {"load": [], "check": [], "read": [], "forward": []}

    def timed_check(model) -> None:
        start = time.perf_counter()
        check_finite(model)
        times["check"].append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        flux_shaped(double, single, dtype=torch.bfloat16).save_pretrained(src)
        FluxTransformer2DModel.from_pretrained(
            src, dtype=torch.bfloat16, quantization_config=SVDQuantConfig()
        ).save_pretrained(out)
        with mock.patch.object(diffusers_quantizer, "check_finite", timed_check):
            for _ in range(args.repeats):
                start = time.perf_counter()
                model = FluxTransformer2DModel.from_pretrained(out)
                times["load"].append(time.perf_counter() - start)
                checked = [t for m in model.modules() if isinstance(m, SVDQuantLinear) for t in m.parameters()]
                start = time.perf_counter()
                for t in model.state_dict().values():
                    t.clone()
                times["read"].append(time.perf_counter() - start)
                inputs = model_inputs(model) | {"timestep": timestep_value(model, 0.5)}
                start = time.perf_counter()
                with torch.inference_mode():
                    model(**inputs)
                times["forward"].append(time.perf_counter() - start)
                layers = sum(isinstance(m, SVDQuantLinear) for m in model.modules())
                mib = sum(t.numel() * t.element_size() for t in checked if t.is_floating_point()) / 2**20
                total = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
                del model
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"FLUX.1-shaped, {double} double + {single} single blocks, {layers} quantized layers, bf16; "
          f"check over {mib:.1f} MiB of {total:.1f} MiB; medians of {args.repeats}")  # fmt: skip
    print(f"from_pretrained (mapped, check included) {med['load'] * 1e3:.1f} ms, of which the check "
          f"{med['check'] * 1e3:.2f} ms; first read of every tensor {med['read'] * 1e3:.1f} ms; first forward "
          f"{med['forward'] * 1e3:.1f} ms")  # fmt: skip
    check = med["check"]
    print(f"check = {100 * check / med['load']:.1f}% of the mapped load (which reads no data), "
          f"{100 * check / (med['load'] + med['read']):.1f}% of load + first read, "
          f"{100 * check / (med['load'] + med['forward']):.2f}% of load + first forward (the bound: 2%)")  # fmt: skip


if __name__ == "__main__":
    main()
