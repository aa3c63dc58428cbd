"""The error bound docs/design.md §1 states for a bfloat16 layer's low-rank branch computed from bf16-rounded
operands (the ``amx`` CPU path, on AMX tiles), and the calls it applies to. Every other call of every
path equals the float32 branch up to float32 summation order."""

from __future__ import annotations

import torch

BF16_BRANCH_ISAS = ("amx",)
DIRECT_MAX_M = 8  # up to 8 rows the GEMM reads the canonical weights directly, with the float32 branch


def bf16_branch(isa: str, m: int, r: int, dtype: torch.dtype) -> bool:
    """True when a call with a bf16 output and bf16 weights computes its branch from bf16-rounded operands."""
    return isa in BF16_BRANCH_ISAS and dtype == torch.bfloat16 and r > 0 and m > DIRECT_MAX_M


def branch_bound(ref: torch.Tensor, lora_act: torch.Tensor, lora_up: torch.Tensor,
                 x_hat: torch.Tensor | None = None, lora_down: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Per output, what a bf16-branch result may differ from the float32 result ``ref`` [M, N]: the output's own
    rounding 2^-8·|ref|, plus 2^-8·Σ_r |lora_up[n, r]|·(|lora_act[m, r]| + Σ_k |x̂[m, k]·lora_down[k, r]|) (each
    rounded operand's relative error is at most 2^-8; the second term only when the down projection is rounded
    too, ``x_hat`` given), plus 2^-14 of both for the float32 summation and the rounding of the perturbed sum."""
    up = lora_up.float().abs()
    weight = lora_act.float().abs()
    if x_hat is not None:
        weight = weight + x_hat.float().abs() @ lora_down.float().abs()
    s = weight @ up.T
    return 2**-8 * ref.abs() + 2**-8 * s + 2**-14 * (ref.abs() + s)


def within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> bool:
    return bool(((out.float() - ref).abs() <= bound).all())
