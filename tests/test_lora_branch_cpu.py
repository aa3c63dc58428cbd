"""The low-rank branch of bfloat16 layers on AMX tiles (the ``amx`` CPU path): within the bound
docs/design.md §1 states (``branch_bound``), and the float32 branch, bit for bit the ``avx512vnni`` path's,
everywhere else (float32 / float16, M <= 8, the canonical ``quantize_act``)."""

from __future__ import annotations

import pytest
import torch
from branch_bound import branch_bound, within

from diffusers_svdquant import ops, reference

pytestmark = pytest.mark.skipif(
    not ops.native_available() or "amx" not in ops.supported_cpu_isas(),
    reason="needs the amx CPU path (AMX-BF16, granted by the OS)",
)
BF16 = torch.bfloat16


@pytest.fixture
def amx():
    before = ops.cpu_isa()
    ops.set_cpu_isa("amx")
    yield
    ops.set_cpu_isa(before)


def _on(isa, fn):
    before = ops.cpu_isa()
    ops.set_cpu_isa(isa)
    try:
        return fn()
    finally:
        ops.set_cpu_isa(before)


def _layer(n, k, r, dtype, seed):
    """Canonical tensors with a rank-r branch of a fused LoRA's scale (any r, not capped by N and K)."""
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02).to(dtype)
    smooth = torch.empty(k).uniform_(0.5, 4.0, generator=g).to(dtype)
    lora_down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype)
    lora_up = torch.randn(n, r, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return qweight, wscales, smooth, lora_down, lora_up, bias


def _x(m, k, dtype, seed):
    return (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def _gemm_case(m, n, k, r, seed):
    qweight, wscales, smooth, lora_down, lora_up, bias = _layer(n, k, r, BF16, seed)
    q_x, s_x, lora_act = reference.quantize_act(_x(m, k, BF16, seed), smooth, lora_down)
    ref = reference.gemm_w4a4(q_x, s_x, qweight, wscales, lora_act, lora_up, bias, torch.float32)
    return (q_x, s_x, qweight, wscales, lora_act, lora_up, bias), ref


# Rows: the first above the direct path (9), one and several 16-row AMX blocks with remainders, several row
# chunks (300); columns: one, a tail, whole tiles, odd tile counts; ranks: none, one, the rank-32 + 32 + 32
# branch of two fused LoRAs (96), and one more (97: an odd pair, a partial 32-rank A tile).
@pytest.mark.parametrize("m", [9, 17, 63, 64, 65, 300])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (17, 192), (40, 3072), (200, 128)])
@pytest.mark.parametrize("r", [0, 1, 32, 96, 97])
def test_gemm_bf16_branch_is_within_the_bound(amx, m, n, k, r):
    args, ref = _gemm_case(m, n, k, r, seed=m + n + k + r)
    out = torch.ops.svdquant.gemm_w4a4(*args, BF16)
    assert out.dtype == BF16 and out.shape == (m, n)
    assert within(out, ref, branch_bound(ref, args[4], args[5]))
    if r >= 32 and m * n >= 64 * 40:  # the AMX branch ran: not the float32 branch's rounding, bit for bit
        assert not torch.equal(out, ref.to(BF16))


@pytest.mark.parametrize("r", [1, 97])
def test_the_bound_catches_a_missing_rank(amx, r):
    """The check above can fail: a branch without its last rank is outside the bound."""
    args, ref = _gemm_case(64, 40, 3072, r, seed=5)
    lora_act = args[4].clone()
    lora_act[:, -1] = 0
    out = torch.ops.svdquant.gemm_w4a4(*args[:4], lora_act, *args[5:], BF16)
    assert not within(out, ref, branch_bound(ref, args[4], args[5]))


@pytest.mark.parametrize("m", [1, 8, 9, 130])
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16])
def test_the_float32_branch_elsewhere_is_avx512vnni_bit_for_bit(m, dtype):
    """float32 / float16 outputs, float32 weights with a bf16 output, and M <= 8 keep the float32 branch."""
    qweight, wscales, smooth, lora_down, lora_up, bias = _layer(40, 3072, 96, dtype, seed=m)
    q_x, s_x, lora_act = reference.quantize_act(_x(m, 3072, dtype, m), smooth, lora_down)
    for out_dtype in (torch.float32, dtype):
        args = (q_x, s_x, qweight, wscales, lora_act, lora_up, bias, out_dtype)
        if out_dtype == BF16 and dtype == BF16 and m > 8:
            continue  # the AMX branch (above)
        outs = [_on(isa, lambda a=args: torch.ops.svdquant.gemm_w4a4(*a)) for isa in ("avx512vnni", "amx")]
        assert torch.equal(outs[0], outs[1]), out_dtype
    x = _x(m, 3072, dtype, m)
    if dtype != BF16 or m <= 8:
        lin = [_on(isa, lambda: ops.svdquant_linear(x, qweight, wscales, smooth, lora_down, lora_up, bias))
               for isa in ("avx512vnni", "amx")]  # fmt: skip
        assert torch.equal(lin[0], lin[1])
    # The canonical quantize_act outputs float32 lora_act: the float32 down projection on every path.
    qa = [_on(isa, lambda: torch.ops.svdquant.quantize_act(x, smooth, lora_down))
          for isa in ("avx512vnni", "amx")]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(*qa, strict=True))


# The whole linear (one native call): x̂ rounded to bf16 for the down projection (AMX, from 9 rows) and
# lora_act for the up projection. K = 12288 is FLUX's MLP down projection (48 blocks of 256).
@pytest.mark.parametrize("m", [9, 33, 257])
@pytest.mark.parametrize(("n", "k"), [(40, 192), (64, 3072), (16, 12288)])
@pytest.mark.parametrize("r", [1, 32, 96, 97])
def test_linear_bf16_branch_is_within_the_bound(amx, m, n, k, r):
    qweight, wscales, smooth, lora_down, lora_up, bias = _layer(n, k, r, BF16, seed=m * k + r)
    x = _x(2 * m, k, BF16, seed=m)[::2]  # non-contiguous rows
    y = ops.svdquant_linear(x, qweight, wscales, smooth, lora_down, lora_up, bias)
    f = [t.float() for t in (x, wscales, smooth, lora_down, lora_up, bias)]
    ref = reference.svdquant_linear(f[0], qweight, f[1], f[2], f[3], f[4], f[5])
    x_hat = f[0] / f[2]
    assert y.dtype == BF16
    assert within(y, ref, branch_bound(ref, x_hat @ f[3], lora_up, x_hat, lora_down))
    # In norm, about one more bf16 rounding: a wrong rank or pairing is far outside this.
    own = (ref.to(BF16).float() - ref).norm()
    assert (y.float() - ref).norm() <= 2 * own


@pytest.mark.parametrize("m", [17, 130])
def test_amx_results_do_not_depend_on_threads(amx, m):
    qweight, wscales, smooth, lora_down, lora_up, bias = _layer(200, 3072, 96, BF16, seed=1)
    x = _x(m, 3072, BF16, seed=2)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(ops.svdquant_linear(x, qweight, wscales, smooth, lora_down, lora_up, bias))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
