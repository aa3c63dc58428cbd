"""What the load-time integrity check costs: loading the FLUX-shaped demo model and running it once.

    python benchmarks/bench_load_checks.py [--blocks 1,1] [--repeats 40]

Saves a FLUX.1-shaped transformer (real layer sizes) quantized in bf16, then, in one process, loads the saved
checkpoint with ``from_pretrained`` three ways, interleaved so that a neighbour's load on the machine hits all
alike: as it ships (the scan of the quantized layers' float tensors started on a background thread before
diffusers reads the weights, ``checkpoint_files.FiniteCheck``, and its result taken at the end), with the same
scan done in the foreground at the end instead (``check_finite`` alone: what the loader did before), and with
no check at all. The difference to no check is what the check costs the load. ``from_pretrained`` maps the
file and reads no data, so the figures are also printed against the load plus the model's first use (one
read of every tensor; one forward of the demo's inputs, 256 image + 64 text tokens). The issue's bound is 2%
of the load.
"""

from __future__ import annotations

import argparse
import os
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

MODES = ("background", "foreground", "none")


def load(path: str, mode: str) -> FluxTransformer2DModel:
    """``from_pretrained(path)`` with the check as shipped, done in the foreground, or switched off."""
    patches = []
    if mode != "background":
        patches.append(mock.patch.object(diffusers_quantizer, "FiniteCheck", lambda *args: None))
    if mode == "none":
        patches.append(mock.patch.object(diffusers_quantizer, "check_finite", lambda *args: None))
    for p in patches:
        p.start()
    try:
        return FluxTransformer2DModel.from_pretrained(path)
    finally:
        for p in patches:
            p.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="1,1", help="double,single blocks of the FLUX.1-shaped model")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable_progress_bar()
    double, single = (int(v) for v in args.blocks.split(","))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    times: dict[str, list[float]] = {m: [] for m in MODES} | {"read": [], "forward": []}
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        flux_shaped(double, single, dtype=torch.bfloat16).save_pretrained(src)
        FluxTransformer2DModel.from_pretrained(
            src, dtype=torch.bfloat16, quantization_config=SVDQuantConfig()
        ).save_pretrained(out)
        # The loads first, without a forward in between: torch's OpenMP workers spin on the other core for a
        # while after a parallel forward, which would leave the background scan no core for the next load.
        # Each round rotates the order, so no mode always follows another.
        for repeat in range(args.repeats + 1):  # the first round warms the caches and is dropped
            for mode in MODES[repeat % 3 :] + MODES[: repeat % 3]:
                start = time.perf_counter()
                model = load(out, mode)
                if repeat:
                    times[mode].append(time.perf_counter() - start)
                del model
        for _ in range(3):  # the model's first use, for scale
            model = load(out, "none")
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
    base = med["none"]
    print(f"FLUX.1-shaped, {double} double + {single} single blocks, {layers} quantized layers, bf16; "
          f"check over {mib:.1f} MiB of {total:.1f} MiB; medians of {args.repeats} rounds; load average "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"from_pretrained (mapped, reads no data): no check {base * 1e3:.2f} ms; first read of every tensor "
          f"{med['read'] * 1e3:.1f} ms; first forward {med['forward'] * 1e3:.1f} ms")  # fmt: skip
    for mode, what in (("background", "background scan (as shipped)"), ("foreground", "foreground scan")):
        # The median of each round's difference, not the difference of medians: a neighbour's burst on the
        # machine then moves one round's three loads alike instead of one mode's median.
        extra = statistics.median(a - b for a, b in zip(times[mode], times["none"], strict=True))
        first_read, first_forward = base + med["read"], base + med["forward"]
        print(f"{what:28s} load {med[mode] * 1e3:6.2f} ms: the check adds {extra * 1e3:5.2f} ms = "
              f"{100 * extra / base:4.1f}% of the mapped load, {100 * extra / first_read:.2f}% of load + first "
              f"read, {100 * extra / first_forward:.2f}% of load + first forward (bound: 2%)")  # fmt: skip


if __name__ == "__main__":
    main()
