"""The main job: quantize a diffusion model on load, generate with it, and print memory, quality and speed.

    svdquant demo                          # a FLUX.1-shaped model built locally
    svdquant demo --model PATH_OR_REPO [--subfolder transformer]

It runs the same flow-matching Euler trajectory (same seed, same inputs) with the 16-bit model and
with the SVDQuant model quantized on load (the default config: W4A4 linears, the AdaLN modulation
linears weight-only W4A16), and compares the final latents.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import AutoModel

from svdquant_cli import arguments

from .. import ops
from ..config import SVDQuantConfig
from ..denoisers import model_inputs, timestep_value
from ..dtypes import DTYPES
from ..linear import SVDQuantLinear, W4A16Linear
from ..metrics import cosine, psnr, rel_error
from .model_zoo import flux_shaped, weight_bytes


def generate(
    model: torch.nn.Module, steps: int, image_tokens: int, text_tokens: int
) -> tuple[torch.Tensor, list[float]]:
    """Euler steps of the flow ``dx/dt = -v(x, t)`` from t=1 to 0 with fixed random conditioning.

    Returns the final latents (float32) and the wall time of each model call.
    """
    inputs = model_inputs(model, image_tokens, text_tokens)
    key = "hidden_states" if "hidden_states" in inputs else "sample"
    x = inputs.pop(key).float()
    times = []
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            start = time.perf_counter()
            v = model(**{key: x.to(inputs_dtype(model))}, **inputs, timestep=timestep_value(model, float(t)),
                      return_dict=False)[0]  # fmt: skip
            times.append(time.perf_counter() - start)
            x = x + (t_next - t) * v.float()
    return x, times


def inputs_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _load(source: str, subfolder: str | None, dtype: torch.dtype, config: SVDQuantConfig | None):
    kwargs = {"dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if config is not None:
        kwargs["quantization_config"] = config
    start = time.perf_counter()
    model = AutoModel.from_pretrained(source, **kwargs).eval()
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusers_svdquant.apps.demo``: parse ``argv`` (the options of ``svdquant demo``) and run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    arguments.add_demo_arguments(p)
    return run(arguments.parse_args(p, argv))


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments; returns the exit code."""
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}, native kernels: "
        f"{'yes, ' + str(ops.cpu_isa()) if ops.native_available() else 'no (' + str(ops.native_error()) + ')'}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        source = args.model
        if source is None:
            double, single = (int(v) for v in args.blocks.split(","))
            print(f"building a FLUX.1-shaped transformer ({double} double + {single} single blocks, real layer sizes)")
            flux_shaped(double, single, dtype=dtype).save_pretrained(tmp)
            source = tmp

        model16, t16 = _load(source, args.subfolder, dtype, None)
        bytes16 = weight_bytes(model16)
        print(f"16-bit model ({args.dtype}): {bytes16 / 2**20:,.1f} MiB of weights, loaded in {t16:.1f} s")
        ref, times16 = generate(model16, args.steps, args.image_tokens, args.text_tokens)
        del model16

        config = SVDQuantConfig(rank=args.rank)
        modelq, tq = _load(source, args.subfolder, dtype, config)
        bytesq = weight_bytes(modelq)
        n_quant = sum(isinstance(m, SVDQuantLinear) for m in modelq.modules())
        n_w4a16 = sum(isinstance(m, W4A16Linear) for m in modelq.modules())
        print(
            f"SVDQuant r{args.rank}: {n_quant} layers quantized on load ({n_quant - n_w4a16} W4A4, {n_w4a16} "
            f"weight-only W4A16) in {tq:.1f} s, "
            f"{bytesq / 2**20:,.1f} MiB of weights ({bytes16 / bytesq:.2f}x smaller)"
        )
        out, timesq = generate(modelq, args.steps, args.image_tokens, args.text_tokens)

    print(
        f"quality after {args.steps} denoising steps vs {args.dtype}: relative error {rel_error(out, ref):.4f}, "
        f"cosine {cosine(out, ref):.5f}, PSNR {psnr(out, ref):.1f} dB"
    )
    m16, mq = statistics.median(times16), statistics.median(timesq)
    print(f"speed per denoiser call: {args.dtype} {m16:.2f} s, SVDQuant {mq:.2f} s ({m16 / mq:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
