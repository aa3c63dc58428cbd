"""What LoRAs cost on a quantized model on CPU: per linear and for a FLUX.1-shaped block stack.

Each layer or model runs without LoRA, with 1 and with 2 unfused LoRAs (PEFT's forward beside the fused W4A4
kernel), and with the 2 fused into the low-rank branch (``fuse_lora``: one kernel call of rank r0 + 2r), at LoRA
ranks 16 and 32 (base rank 32); per linear also fused with PEFT's wrapper removed (``fused+unload``, what the block
stack's fused line is). Printed: median times and their ratio to no LoRA. The goals (issue 14): at rank
32 + 32, fused costs at most 10% more than no LoRA and unfused at most 30%.

    python benchmarks/bench_lora_cpu.py [--tokens 256] [--blocks 1,2] [--image-tokens 1024] [--text-tokens 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear, ops
from diffusers_svdquant.apps.model_zoo import flux_shaped
from diffusers_svdquant.denoisers import model_inputs, timestep_value

DTYPE = torch.bfloat16
LINEARS = ((3072, 3072), (3072, 12288), (12288, 3072))  # FLUX.1: attention, MLP up, MLP down
LORA_RANKS = (16, 32)


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in rounds that visit every call once (after one warm-up each), so that
    load from other processes on a shared machine spreads over all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lora_state_dict(model: nn.Module, names: list[str], r: int, seed: int) -> dict[str, torch.Tensor]:
    """A random PEFT-format LoRA of rank ``r`` on the layers ``names``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        m = model.get_submodule(n)
        sd[f"{n}.lora_A.weight"] = (torch.randn(r, m.in_features, generator=g) * 0.01).to(DTYPE)
        sd[f"{n}.lora_B.weight"] = (torch.randn(m.out_features, r, generator=g) * 0.01).to(DTYPE)
    return sd


def lora_calls(plain: nn.Module, copy_with_loras: Callable[[int | None, bool], nn.Module],
               run: Callable[[nn.Module], object]) -> dict[str, Callable[[], object]]:  # fmt: skip
    """One call per setting: no LoRA, and per rank 1 and 2 unfused LoRAs and the 2 fused, each on its own copy."""
    calls = {"no LoRA": lambda: run(plain)}
    for r in LORA_RANKS:
        one, two, fused = copy_with_loras(r, False), copy_with_loras(r, False), copy_with_loras(r, True)
        one.set_adapters(["style"])  # the same two adapters loaded, one active
        calls[f"1 LoRA r{r} unfused"] = lambda m=one: run(m)
        calls[f"2 LoRAs r{r}+{r} unfused"] = lambda m=two: run(m)
        calls[f"2 LoRAs r{r}+{r} fused"] = lambda m=fused: run(m)
    return calls


def report(title: str, times: dict[str, float]) -> None:
    base = times["no LoRA"]
    print(f"\n{title}")
    for name, t in times.items():
        print(f"  {name:<28} {t * 1e3:9.2f} ms   x{t / base:5.3f}")


class _Holder(nn.Module):
    """One linear under the name PEFT targets, with diffusers-like adapter switching."""

    def __init__(self, fc: nn.Module) -> None:
        super().__init__()
        self.fc = fc

    def set_adapters(self, names: list[str]) -> None:
        self.fc.set_adapter(names)


def bench_linear(k: int, n: int, tokens: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    plain = _Holder(SVDQuantLinear.from_linear(nn.Linear(k, n, dtype=DTYPE), 32))
    x = torch.randn(tokens, k, dtype=DTYPE)

    def copy_with_loras(r: int, fuse: bool) -> nn.Module:
        holder = copy.deepcopy(plain)
        for seed, name in enumerate(("style", "detail")):
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["fc"], init_lora_weights=False)
            torch.manual_seed(seed)
            inject_adapter_in_model(cfg, holder, adapter_name=name)
        holder.set_adapters(["style", "detail"])
        if fuse:
            holder.fc.merge()
        return holder

    calls = lora_calls(plain, copy_with_loras, lambda m: m.fc(x))
    # What fuse_lora + unload_lora_weights leave (as the block stack below runs it): the layer of rank 32 + 64
    # without PEFT's wrapper, whose Python forward the "fused" line above still pays.
    unloaded = copy_with_loras(32, True)
    unloaded.fc = unloaded.fc.get_base_layer()
    calls["2 LoRAs r32+32 fused+unload"] = lambda: unloaded.fc(x)
    return interleaved_medians(calls, repeats)


def bench_blocks(double: int, single: int, image: int, text: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        flux_shaped(double, single, dtype=DTYPE).save_pretrained(tmp)
        plain = FluxTransformer2DModel.from_pretrained(
            tmp, quantization_config=SVDQuantConfig(rank=32), torch_dtype=DTYPE
        ).eval()
    inputs = model_inputs(plain, image, text) | {"timestep": timestep_value(plain, 0.5)}
    names = [n for n, m in plain.named_modules() if isinstance(m, SVDQuantLinear)]

    def copy_with_loras(r: int, fuse: bool) -> nn.Module:
        model = copy.deepcopy(plain)
        for seed, name in enumerate(("style", "detail")):
            model.load_lora_adapter(lora_state_dict(model, names, r, seed), adapter_name=name, prefix=None)
        model.set_adapters(["style", "detail"])
        if fuse:
            model.fuse_lora()
            model.unload_lora()
        return model

    return interleaved_medians(lora_calls(plain, copy_with_loras, lambda m: m(**inputs, return_dict=False)), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="rows M of the per-linear runs")
    p.add_argument("--blocks", default="1,2", help="double,single FLUX.1-shaped blocks")
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-blocks", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, svdquant CPU path {ops.cpu_isa()}, {DTYPE}, base rank 32")  # fmt: skip
    goals = []
    for k, n in LINEARS:
        times = bench_linear(k, n, args.tokens, args.repeats)
        report(f"SVDQuantLinear [{n}, {k}], M = {args.tokens}", times)
        goals.append((f"linear [{n}, {k}]", times))
    if not args.skip_blocks:
        double, single = (int(b) for b in args.blocks.split(","))
        times = bench_blocks(double, single, args.image_tokens, args.text_tokens, max(3, args.repeats // 2))
        report(f"FLUX.1-shaped {double} double + {single} single blocks, {args.image_tokens} + {args.text_tokens} "
               f"tokens, every quantized linear with the LoRAs", times)  # fmt: skip
        goals.append(("block stack", times))
    print("\ngoals at r32+32: fused <= x1.10, unfused <= x1.30")
    for name, times in goals:
        fused = times["2 LoRAs r32+32 fused"] / times["no LoRA"]
        unfused = times["2 LoRAs r32+32 unfused"] / times["no LoRA"]
        unloaded = times.get("2 LoRAs r32+32 fused+unload", float("nan")) / times["no LoRA"]
        print(f"  {name:<24} fused x{fused:5.3f} {'ok' if fused <= 1.10 else 'MISSED'}   "
              f"unfused x{unfused:5.3f} {'ok' if unfused <= 1.30 else 'MISSED'}   "
              f"fused+unload x{unloaded:5.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
