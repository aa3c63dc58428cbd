"""The fused W4A4 and W4A16 linears on an NVIDIA GPU vs torch.nn.functional.linear in bf16 (cuBLAS), same inputs.

W4A4 = ``SVDQuantLinear``'s CUDA path: quantize_act (smooth, INT4, low-rank down projection, one
read of x) + the tensor-core GEMM with the low-rank and bias epilogue (``cpp/cuda``), bf16 in and
out, weights already in the mma layout. Per linear at FLUX.1 shapes, then a whole FLUX.1-shaped
transformer block (one double + one single block, 4096 image + 512 text tokens) quantized vs bf16.

W4A16 = ``svdquant::linear_w4a16`` (weight-only: bf16 activations, unsigned 4-bit weights with a scale
and a minimum per 64-group, r = 32 low-rank branch, bias) at M = 1, 4, 16, 256 on the FLUX.1 shapes, vs
bf16 F.linear in the same process. Up to 16 rows it prints the GEMV (the default) and the mma GEMM forced
on the same input, so the crossover can be read off; GB/s counts the 4-bit weights plus scales and minima.

Timing: CUDA events around ``--iters`` back-to-back calls after warm-up, the median of
``--repeats`` such runs. TOPS counts 2·M·N·K (the low-rank branch is not counted). The GEMM path
(``s4`` on sm_8x, ``s8`` on sm_90) is printed; ``--path s8`` forces the int8 path on sm_8x.

    python benchmarks/bench_linear_cuda.py [--quick] [--repeats 5] [--iters 20] [--path auto|s4|s8]
                                           [--w4a16-only]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from diffusers_svdquant import SVDQuantConfig, algorithm, ops, quantize_, reference
from diffusers_svdquant.apps.model_zoo import FLUX1_CONFIG, flux_shaped
from diffusers_svdquant.denoisers import model_inputs, timestep_value

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]
ROWS = [1024, 4096]
W4A16_SHAPES = [(3072, 18432), (3072, 12288), (12288, 3072)]
W4A16_ROWS = [1, 4, 16, 256]


def cuda_time(repeats: int, iters: int, fn, *args, **kwargs) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn(*args, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def bench_linears(shapes, rows, repeats: int, iters: int) -> None:
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | {'W4A4 ms':>8} {'TOPS':>6} | {'bf16 ms':>8} {'TFLOPS':>6} | {'speed-up':>8} | "
        f"{'quantize_act ms':>15}"
    )
    torch.manual_seed(0)
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda") / k**0.5
        q = algorithm.quantize_weight(w, 32, dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        packed = ops.pack_mma_weights(q.qweight, q.wscales, q.lora_up, bias)
        w16 = w.to(torch.bfloat16)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_q = cuda_time(repeats, iters, ops.svdquant_linear_mma, x, q.smooth, q.lora_down, packed)
            t_a = cuda_time(repeats, iters, torch.ops.svdquant.quantize_act, x, q.smooth, q.lora_down)
            t_16 = cuda_time(repeats, iters, torch.nn.functional.linear, x, w16, bias)
            tera = 2 * m * n * k / 1e12
            print(
                f"{m:>5} {k:>6} {n:>6} | {t_q * 1e3:>8.3f} {tera / t_q:>6.0f} | {t_16 * 1e3:>8.3f} "
                f"{tera / t_16:>6.0f} | {t_16 / t_q:>7.2f}x | {t_a * 1e3:>15.3f}"
            )


def bench_w4a16(shapes, rows, repeats: int, iters: int) -> None:
    print(
        f"{'M':>5} {'K':>6} {'N':>6} | {'W4A16 ms':>8} {'kernel':>6} {'GB/s':>6} | {'GEMM ms':>8} | "
        f"{'bf16 ms':>8} | {'speed-up':>8}"
    )
    torch.manual_seed(0)
    for k, n in shapes:
        codes, wscales, wmins = reference.quantize_groups_affine(
            torch.randn(n, k, device="cuda") / k**0.5, param_dtype=torch.bfloat16
        )
        qweight = reference.pack_int4(codes)
        del codes
        w16 = reference.dequantize_groups_affine(reference.unpack_uint4(qweight), wscales, wmins).to(torch.bfloat16)
        smooth = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        lora_down = torch.randn(k, 32, device="cuda", dtype=torch.bfloat16) / k**0.5
        lora_up = torch.randn(n, 32, device="cuda", dtype=torch.bfloat16) * 0.01
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        weights = (qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
        weight_bytes = qweight.numel() + 2 * wscales.numel() * wscales.element_size()
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_w = cuda_time(repeats, iters, torch.ops.svdquant.linear_w4a16, x, *weights)
            kernel = "gemv" if m <= ops.cuda_w4a16.GEMV_MAX_ROWS else "gemm"
            gemm = "-"
            if kernel == "gemv":
                ops.set_cuda_w4a16_path("gemm")
                gemm = f"{cuda_time(repeats, iters, torch.ops.svdquant.linear_w4a16, x, *weights) * 1e3:.3f}"
                ops.set_cuda_w4a16_path("auto")
            t_16 = cuda_time(repeats, iters, torch.nn.functional.linear, x, w16, bias)
            print(
                f"{m:>5} {k:>6} {n:>6} | {t_w * 1e3:>8.3f} {kernel:>6} {weight_bytes / t_w / 1e9:>6.0f} | "
                f"{gemm:>8} | {t_16 * 1e3:>8.3f} | {t_16 / t_w:>7.2f}x"
            )


def bench_block(repeats: int, iters: int, image_tokens: int, text_tokens: int) -> None:
    model = flux_shaped(num_layers=1, num_single_layers=1, dtype=torch.bfloat16).cuda().eval()
    inputs = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in model_inputs(model, image_tokens, text_tokens).items()
    }
    inputs["timestep"] = timestep_value(model, 0.5).cuda()

    def call(mod):
        with torch.no_grad():
            return mod(**inputs, return_dict=False)[0]

    t_16 = cuda_time(repeats, iters, call, model)
    y_16 = call(model).float()
    quantize_(model, SVDQuantConfig(rank=32))
    t_q = cuda_time(repeats, iters, call, model)
    y_q = call(model).float()
    rel = ((y_q - y_16).norm() / y_16.norm()).item()
    print(
        f"FLUX.1-shaped 1 double + 1 single block ({FLUX1_CONFIG['num_attention_heads']} heads, "
        f"{image_tokens} image + {text_tokens} text tokens): bf16 {t_16 * 1e3:.2f} ms, "
        f"W4A4 r32 {t_q * 1e3:.2f} ms, {t_16 / t_q:.2f}x; output relative error vs bf16 {rel:.4f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only (3072, 3072) at M = 4096, no block")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--path", choices=["auto", "s4", "s8"], default="auto")
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--w4a16-only", action="store_true", help="only the weight-only (W4A16) lines")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch")
    if not ops.cuda_kernels_available():
        raise SystemExit("diffusers_svdquant._C was built without the CUDA kernels (no nvcc at build time?)")
    ops.set_cuda_mma_path(args.path)
    dev = torch.cuda.get_device_properties(0)
    print(
        f"GPU: {dev.name} (sm_{dev.major}{dev.minor}, {dev.multi_processor_count} SMs); torch {torch.__version__}; "
        f"svdquant GEMM path {ops.cuda_mma_path()}"
    )
    if not args.w4a16_only:
        shapes, rows = (SHAPES[:1], [4096]) if args.quick else (SHAPES, ROWS)
        bench_linears(shapes, rows, args.repeats, args.iters)
    print("\nW4A16 (weight-only) vs bf16 F.linear; 'GEMM ms': the mma GEMM forced on the same input")
    w4a16_shapes, w4a16_rows = (W4A16_SHAPES[:1], [1, 256]) if args.quick else (W4A16_SHAPES, W4A16_ROWS)
    bench_w4a16(w4a16_shapes, w4a16_rows, args.repeats, args.iters)
    if not args.quick and not args.w4a16_only:
        bench_block(args.repeats, max(1, args.iters // 4), args.image_tokens, args.text_tokens)


if __name__ == "__main__":
    main()
