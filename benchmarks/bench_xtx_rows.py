"""How many calls GPTQ's XᵀX needs: calibrate's ``hessian_rows_per_column`` measured on one FLUX-sized layer.

calibrate keeps, per layer, a pseudo-random share of its denoiser calls for ``XᵀX`` (``calibration.recorder``'s
``call_fraction`` / ``keeps_call``, used here as they are) for about N rows per input column. Whether that costs
quality depends on how alike the rows of one call are, which no tiny test model shows (its calls offer 1–8 rows
per column). So this bench draws the inputs of one 3072 → 3072 layer from a model with that structure:

* each row is ``B (g_prompt + h_prompt,step + e_token)`` in a 96-dimensional subspace (``B`` fixed, Gaussian
  prompt and prompt-step parts, Student-t(4) token part), plus Student-t(4) noise in every channel, times
  log-normal channel scales, with 12 outlier channels x 30: the rows of one call share their prompt and step;
* ``--prompts`` x ``--steps`` calls of ``--tokens`` rows each (FLUX.1 at 128 x 8 offers its wide layers
  300–1,500 rows per column; the defaults here offer 170).

Each setting quantizes the layer as calibrate + quantize-on-load do (SVDQuant W4A4, rank 32, α = 0.5 from the
absmax of every row, GPTQ with the damping for the rows summed) and prints the held-out relative output error
``‖X_h (W − Ŵ)ᵀ‖² / ‖X_h Wᵀ‖²`` on rows of prompts not calibrated on, of the weight alone (what GPTQ minimises)
and through the W4A4 linear (its activations quantized too), with round-to-nearest and ``XᵀX`` of fewer prompts
(``hessian_prompts``, every call) at about the same rows.

    python benchmarks/bench_xtx_rows.py [--seeds 2] [--prompts 32 --steps 8 --tokens 2048] [--k 3072]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from diffusers_svdquant import algorithm, reference
from diffusers_svdquant.calibration.passes import spread_items
from diffusers_svdquant.calibration.recorder import call_fraction, keeps_call


class Inputs:
    """The layer's input rows: one call (prompt, step) at a time, from the model in the module docstring."""

    def __init__(self, k: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k, self.seed = k, seed
        self.basis = torch.randn(k, 96, generator=g) / 96**0.5
        self.scale = torch.exp(0.5 * torch.randn(k, generator=g))
        self.scale[torch.randperm(k, generator=g)[:12]] *= 30

    def call(self, prompt: int, step: int, rows: int) -> torch.Tensor:
        """``[rows, K]`` float32: the rows of prompt ``prompt``'s call at step ``step``."""
        gp = torch.Generator().manual_seed(self.seed * 1_000_003 + prompt)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + prompt) * 97 + step + 1)
        shared = 2.0 * torch.randn(96, generator=gp) + torch.randn(96, generator=g)
        x = (shared + _student_t(rows, 96, g)) @ self.basis.t() + 0.3 * _student_t(rows, self.k, g)
        return x * self.scale


def _student_t(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Student-t with 4 degrees of freedom (unit-ish scale) from ``g``: normal / sqrt(chi² / 4)."""
    z = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(rows, cols, 4, generator=g).square().sum(-1)
    return z / (chi2 / 4).sqrt() / 2**0.5


def _error(
    weight: torch.Tensor,
    rank: int,
    absmax: torch.Tensor,
    held: torch.Tensor,
    hessian: torch.Tensor | None,
    n: int | None,
) -> tuple[float, float]:
    """Held-out relative output errors of ``weight`` ``[N, K]`` quantized as quantize-on-load does (GPTQ against
    ``hessian`` ``[K, K]`` summed over ``n`` rows; None: round to nearest), on rows ``held`` ``[M, K]``: of the
    weight alone, and through the run-time W4A4 linear (activations quantized too: what a user sees)."""
    q = algorithm.svdquant_weight(weight, rank, act_absmax=absmax, smoothing_alpha=0.5, dtype=torch.float32,
                                  hessian=hessian, hessian_rows=n)  # fmt: skip
    y = held @ weight.t()
    energy = y.square().sum()
    w_only = (held @ algorithm.dequantize_weight(q).t() - y).square().sum() / energy
    run = reference.svdquant_linear(held, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, None)
    return float(w_only), float((run.float() - y).square().sum() / energy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=3072, help="input (= output) width")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048, help="rows per call")
    p.add_argument("--targets", default="8,16,32,64", help="hessian_rows_per_column values to compare")
    p.add_argument("--seeds", type=int, default=2, help="independent layers (weight and inputs)")
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    targets = [int(t) for t in args.targets.split(",")]
    calls = args.prompts * args.steps
    offered = calls * args.tokens / args.k
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores; one {args.k} -> {args.k} layer, {args.prompts} prompts x {args.steps} steps x "
          f"{args.tokens} rows ({offered:.0f} rows per input column offered), W4A4 rank {args.rank}")  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {}
    labels: dict[str, str] = {}  # the last layer's (its kept calls and rows differ a little from the others')
    for seed in range(args.seeds):
        start = time.perf_counter()
        data = Inputs(args.k, seed)
        weight = torch.randn(args.k, args.k, generator=torch.Generator().manual_seed(10_000 + seed)) / args.k**0.5
        # Per setting: the XᵀX of the calls it keeps and the rows summed. Settings: every call, each target, and
        # fewer prompts (hessian_prompts, every call of those) at the rows of each target.
        fraction = {t: call_fraction(t, args.k, args.tokens, calls) for t in targets}
        few = {t: spread_items(args.prompts, max(1, round(args.prompts * fraction[t]))) for t in targets}
        sums = {"all": torch.zeros(args.k, args.k)} | {f"rows {t}": torch.zeros(args.k, args.k) for t in targets}
        sums |= {f"prompts {len(few[t])}": torch.zeros(args.k, args.k) for t in targets}
        rows = dict.fromkeys(sums, 0)
        absmax = torch.zeros(args.k)
        for prompt in range(args.prompts):
            for step in range(args.steps):
                x = data.call(prompt, step, args.tokens)
                absmax = torch.maximum(absmax, x.abs().amax(0))
                xtx = x.t() @ x
                chosen = ["all"] + [f"rows {t}" for t in targets if keeps_call(seed, args.k, args.tokens, prompt,
                                                                                 step, fraction[t])]  # fmt: skip
                chosen += [f"prompts {len(few[t])}" for t in targets if prompt in few[t]]
                for name in dict.fromkeys(chosen):
                    sums[name] += xtx
                    rows[name] += args.tokens
        held = torch.cat([data.call(args.prompts + 1000 + i, s, 256) for i in range(4) for s in range(args.steps)])

        error = functools.partial(_error, weight, args.rank, absmax, held)
        results.setdefault("round to nearest", []).append(error(None, None))
        for name, h in sums.items():
            per_column = f"{rows[name] / args.k:.1f} rows per column"
            if name.startswith("prompts"):
                labels[name] = f"{name} of {args.prompts} (hessian_prompts), every call: {per_column}"
            elif name.startswith("rows"):
                labels[name] = f"hessian_rows_per_column={name[5:]}: {rows[name] // args.tokens} calls, {per_column}"
            else:
                labels[name] = f"every call: {per_column}"
            results.setdefault(name, []).append(error(h, rows[name]))
        print(f"  layer {seed}: {time.perf_counter() - start:.0f} s")
    for which, title in ((0, "weight alone"), (1, "through the W4A4 linear (activations quantized too)")):
        base = [e[which] for e in results["all"]]
        print(f"\nheld-out relative output error, {title}")
        print(f"{'XᵀX from':<72} " + " ".join(f"{f'layer {s}':>10}" for s in range(args.seeds)) + "  vs every call")
        for name, errs in results.items():
            mine = [e[which] for e in errs]
            ratio = sum(e / b for e, b in zip(mine, base, strict=True)) / len(mine)
            print(f"{labels.get(name, name):<72} " + " ".join(f"{e:>10.6f}" for e in mine) + f"  {ratio:>10.4f}x")


if __name__ == "__main__":
    main()
