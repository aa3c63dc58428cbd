"""Peak resident memory of quantize-on-load vs a plain 16-bit load, on FLUX.1-sized blocks.

Each load runs in a fresh subprocess and reads its own ``VmHWM`` (``ru_maxrss`` would not do: Linux
carries it across ``execve`` from the parent that built the model). The claim under test
(issue: quantize-on-load holds at most the quantized model plus a few 16-bit layers) is printed
as the peak above the post-import baseline, in units of the largest 16-bit layer.

diffusers reads a whole checkpoint *file* before any quantizer hook runs, so the bound holds per
shard: the benchmark loads the same weights saved as one file and sharded (as FLUX.1 ships).

    python benchmarks/bench_load_memory.py [--blocks 1,2] [--rank 32] [--shard-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
import diffusers_svdquant
from diffusers import FluxTransformer2DModel
from diffusers_svdquant import SVDQuantConfig
from diffusers_svdquant.apps.model_zoo import weight_bytes
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
path, rank = sys.argv[1], int(sys.argv[2])
import threading
peak_anon = [0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.01)
import time
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
base, base_anon = status("VmRSS"), status("RssAnon")
kw = {"quantization_config": SVDQuantConfig(rank=rank)} if rank else {}
m = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16, **kw)
time.sleep(0.05)
print(json.dumps({"base": base, "peak": status("VmHWM"), "base_anon": base_anon, "peak_anon": peak_anon[0],
                  "weights": weight_bytes(m)}))
"""


def run_child(path: str, rank: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(rank)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--blocks", default="1,2", help="double,single FLUX.1 blocks")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--shard-mb", type=int, default=256, help="shard size of the sharded checkpoint")
    args = p.parse_args()
    from diffusers_svdquant.apps.model_zoo import flux_shaped

    double, single = (int(v) for v in args.blocks.split(","))
    mib = 2**20
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as sharded:
        model = flux_shaped(double, single, dtype=torch.bfloat16)
        largest = max(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
        model.save_pretrained(one)
        model.save_pretrained(sharded, max_shard_size=f"{args.shard_mb}MB")
        del model
        ckpt = sum(os.path.getsize(os.path.join(one, f)) for f in os.listdir(one))
        rows = [
            ("bf16, one file", run_child(one, 0)),
            (f"SVDQuant r{args.rank}, one file", run_child(one, args.rank)),
            (f"bf16, {args.shard_mb} MB shards", run_child(sharded, 0)),
            (f"SVDQuant r{args.rank}, {args.shard_mb} MB shards", run_child(sharded, args.rank)),
        ]
    print(
        f"FLUX.1-shaped transformer, {double} double + {single} single blocks; torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"checkpoint (bf16): {ckpt / mib:,.0f} MiB; largest 16-bit linear: {largest / mib:,.0f} MiB")
    print("RSS counts the checkpoint's mmap'd pages (clean page cache the kernel can drop); anonymous RSS is the")
    print("memory the load itself allocates. Peaks are above the post-import baseline.")
    print(
        f"{'load':<34}{'weights MiB':>12}{'peak RSS MiB':>14}{'peak anon MiB':>15}"
        f"{'(anon - weights) / largest layer':>34}"
    )
    for name, r in rows:
        anon = r["peak_anon"] - r["base_anon"]
        print(
            f"{name:<34}{r['weights'] / mib:>12,.0f}{(r['peak'] - r['base']) / mib:>14,.0f}{anon / mib:>15,.0f}"
            f"{(anon - r['weights']) / largest:>34.1f}"
        )


if __name__ == "__main__":
    main()
