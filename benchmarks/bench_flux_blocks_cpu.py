"""A FLUX.1-shaped transformer (real layer sizes, a few blocks, random weights) on CPU: W4A4 vs 16-bit.

The model is saved in bf16 and loaded in one process as: 16-bit; SVDQuant with the default config
(the AdaLN modulation linears weight-only W4A16, the other block linears W4A4; embedders, ``norm_out``
and ``proj_out`` 16-bit); the previous default (AdaLN 16-bit); AdaLN W4A4 too; and the default with its
16-bit parts in fp32. Printed: the
weight memory of the block stack and of the whole model (what stays resident: the CPU kernels read
the canonical tensors, there is no second packed copy), the end-to-end forward time against bf16 and
against fp32 (torch's faster dtype on CPUs without AVX-512 BF16), and the output error against fp32.

    python benchmarks/bench_flux_blocks_cpu.py [--blocks 1,2] [--image-tokens 1024] [--text-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import FluxTransformer2DModel

from diffusers_svdquant import (
    DEFAULT_MODULES_TO_NOT_CONVERT,
    DEFAULT_WEIGHT_ONLY_MODULES,
    SVDQuantConfig,
    SVDQuantLinear,
    W4A16Linear,
    ops,
)
from diffusers_svdquant.apps.model_zoo import flux_shaped
from diffusers_svdquant.denoisers import model_inputs, timestep_value

BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def block_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters inside the transformer blocks."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(BLOCKS))


def all_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward_time(model: torch.nn.Module, inputs: dict, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of a forward (after one warm-up call) and the output."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, return_dict=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="1,2", help="double,single FLUX.1-shaped blocks")
    p.add_argument("--image-tokens", type=int, default=1024, help="1024 = a 512x512 FLUX image")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    double, single = (int(b) for b in args.blocks.split(","))
    print(f"torch {torch.__version__}, get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, svdquant CPU path {ops.cpu_isa()}; FLUX.1-shaped {double} double "
          f"+ {single} single blocks, {args.image_tokens} image + {args.text_tokens} text tokens, "
          f"rank {args.rank}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        flux_shaped(double, single, dtype=torch.bfloat16).save_pretrained(tmp)
        m16 = FluxTransformer2DModel.from_pretrained(tmp, torch_dtype=torch.bfloat16).eval()
        configs = {
            "default (AdaLN W4A16)": SVDQuantConfig(rank=args.rank),
            "AdaLN 16-bit (until v3)": SVDQuantConfig(
                rank=args.rank,
                modules_to_not_convert=[*DEFAULT_MODULES_TO_NOT_CONVERT, *DEFAULT_WEIGHT_ONLY_MODULES],
                weight_only_modules=[],
            ),
            "AdaLN W4A4": SVDQuantConfig(rank=args.rank, weight_only_modules=[]),
        }
        quantized = {
            name: FluxTransformer2DModel.from_pretrained(tmp, quantization_config=c, torch_dtype=torch.bfloat16).eval()
            for name, c in configs.items()
        }
        # On CPUs without AVX-512 BF16, torch's bf16 attention / norms are emulated: the same model with its
        # 16-bit parts (and scales, low-rank branch) in fp32 is the faster one there.
        # With the non-linears in fp32 the error is the quantization's alone (bf16 attention and norms add
        # ~0.04 by themselves, which hides the AdaLN choice): the two AdaLN choices compared that way too.
        for name in ("default (AdaLN W4A16)", "AdaLN 16-bit (until v3)"):
            quantized[f"{name.split(' (')[0]}, fp32 non-linears"] = FluxTransformer2DModel.from_pretrained(
                tmp, quantization_config=configs[name], torch_dtype=torch.float32
            ).eval()
    inputs = model_inputs(m16, args.image_tokens, args.text_tokens)
    inputs["timestep"] = timestep_value(m16, 0.5)
    t16, ref = forward_time(m16, inputs, max(1, args.repeats // 2))
    m32 = m16.float()  # in place: the bf16 model is not used after this
    inputs32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    t32, ref32 = forward_time(m32, inputs32, args.repeats)
    b16, a16 = block_bytes(m32) // 2, all_bytes(m32) // 2  # bytes as bf16
    del m32
    print(f"\n{'model':<30} {'block weights':>14} {'x smaller':>9} {'all weights':>12} {'x smaller':>9} "
          f"{'forward s':>9} {'vs bf16':>8} {'vs fp32':>8} {'rel err':>8}")  # fmt: skip
    print(f"{'bf16':<30} {b16 / 2**20:>10.1f} MiB {1:>8.2f}x {a16 / 2**20:>8.1f} MiB {1:>8.2f}x {t16:>9.2f} "
          f"{1:>7.2f}x {t32 / t16:>7.2f}x {rel(ref, ref32):>8.4f}")  # fmt: skip
    print(f"{'fp32':<30} {2 * b16 / 2**20:>10.1f} MiB {0.5:>8.2f}x {2 * a16 / 2**20:>8.1f} MiB {0.5:>8.2f}x "
          f"{t32:>9.2f} {t16 / t32:>7.2f}x {1:>7.2f}x {0:>8.4f}")  # fmt: skip
    for name, model in quantized.items():
        bq, aq = block_bytes(model), all_bytes(model)
        dtype_inputs = inputs32 if next(model.parameters()).dtype == torch.float32 else inputs
        tq, out = forward_time(model, dtype_inputs, args.repeats)
        w4a16 = sum(isinstance(m, W4A16Linear) for m in model.modules())
        w4a4 = sum(isinstance(m, SVDQuantLinear) for m in model.modules()) - w4a16
        print(f"{name:<30} {bq / 2**20:>10.1f} MiB {b16 / bq:>8.2f}x {aq / 2**20:>8.1f} MiB {a16 / aq:>8.2f}x "
              f"{tq:>9.2f} {t16 / tq:>7.2f}x {t32 / tq:>7.2f}x {rel(out, ref32):>8.4f}   "
              f"({w4a4} layers W4A4, {w4a16} W4A16)")  # fmt: skip
    print("\nrel err: ||out - out_fp32|| / ||out_fp32|| of the model output (fp32 is the 16-bit weights in fp32).")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


if __name__ == "__main__":
    main()
