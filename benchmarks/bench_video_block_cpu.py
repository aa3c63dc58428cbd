"""One Wan 2.1 (1.3B) transformer block at its real layer sizes on a video latent: bf16 against W4A4.

    python benchmarks/bench_video_block_cpu.py [--frames 9] [--height 48] [--width 48] [--repeats 3]

Video DiTs run their linears on long token sequences (the kernels' M is large): a 9 x 48 x 48 latent is
9 x 24 x 24 = 5,184 tokens after Wan's 1 x 2 x 2 patches. The model is ``WanTransformer3DModel`` with
Wan2.1-T2V-1.3B's published sizes (dim 1536 = 12 heads x 128, FFN 8960, text 4096) and one block, random
weights, built here and saved; it is loaded twice, in bf16 and quantized on load (``SVDQuantConfig()``),
and one forward of each is timed in turn in this process (medians). Torch's bf16 is its fastest path on
AVX-512 BF16 / AMX CPUs; on AVX2-only CPUs its bf16 is emulated and fp32 would be the bar.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from diffusers import WanTransformer3DModel

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear, ops
from diffusers_svdquant.metrics import rel_error

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json, 30 blocks in the real model.
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=9, help="latent frames")
    p.add_argument("--height", type=int, default=48, help="latent height")
    p.add_argument("--width", type=int, default=48, help="latent width")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"torch {torch.__version__}, get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, svdquant CPU path {ops.cpu_isa()}; Wan 2.1 1.3B block, "
          f"{tokens} video tokens + {args.text_tokens} text tokens")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, args.frames, args.height, args.width, generator=g).to(torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, 4096, generator=g).to(torch.bfloat16),
        "timestep": torch.tensor([500], dtype=torch.long),
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        WanTransformer3DModel(**WAN_1_3B, num_layers=1).save_pretrained(tmp)  # float32: from_pretrained casts
        bf16 = WanTransformer3DModel.from_pretrained(tmp, dtype=torch.bfloat16).eval()
        w4a4 = WanTransformer3DModel.from_pretrained(
            tmp, dtype=torch.bfloat16, quantization_config=SVDQuantConfig()
        ).eval()
    quantized = sum(isinstance(m, SVDQuantLinear) for m in w4a4.modules())
    times: dict[str, list[float]] = {"bf16": [], "W4A4": []}
    outs = {}
    with torch.no_grad():
        for name, model in (("bf16", bf16), ("W4A4", w4a4)):  # one warm-up call each
            outs[name] = model(**inputs, return_dict=False)[0].float()
        for _ in range(args.repeats):
            for name, model in (("bf16", bf16), ("W4A4", w4a4)):
                start = time.perf_counter()
                model(**inputs, return_dict=False)
                times[name].append(time.perf_counter() - start)
    t16, tq = statistics.median(times["bf16"]), statistics.median(times["W4A4"])
    print(f"{quantized} block linears W4A4 (rank 32); forward: bf16 {t16:.2f} s, W4A4 {tq:.2f} s ({t16 / tq:.2f}x); "
          f"W4A4 output vs bf16: relative error {rel_error(outs['W4A4'], outs['bf16']):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
