"""The CPU W4A4 GEMM (packed weight layout, every instruction path) against reference.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_svdquant import SVDQuantLinear, algorithm, ops, reference

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="diffusers_svdquant._C not built")

# The per-group integer dot products are exact on both sides; only the float32 scaling and the
# order of accumulation over groups and rank differ: measured <= 3e-7 relative (fp32 output).
REL_TOL = 2e-6


@pytest.fixture(params=ops.supported_cpu_isas() if ops.native_available() else ["none"])
def isa(request):
    before = ops.cpu_isa()
    ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa(before)


def _case(m, n, k, r, dtype, has_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = algorithm.quantize_weight(torch.randn(n, k, generator=g), min(r, n, k), dtype=dtype)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    return q, bias, x


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m", [0, 1, 3, 17, 64])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (7, 192), (200, 128), (64, 3072)])
@pytest.mark.parametrize("r", [0, 1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_gemm_matches_reference(isa, m, n, k, r, dtype):
    q, bias, x = _case(m, n, k, r, dtype, has_bias=(m + n) % 2 == 1)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    p = ops.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    y = torch.ops.svdquant.gemm_w4a4_packed(q_x, s_x, lora_act, p.wp, p.sw, p.lora_up, p.bias, p.n, torch.float32)
    ref = reference.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if m:
        assert _rel(y, ref) < REL_TOL
    out = torch.ops.svdquant.gemm_w4a4_packed(q_x, s_x, lora_act, p.wp, p.sw, p.lora_up, p.bias, p.n, dtype)
    assert out.dtype == dtype and torch.equal(out, y.to(dtype))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(1, 70), groups=st.integers(1, 6), r=st.integers(0, 9),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_packed_gemm_hypothesis(m, n, groups, r, has_bias, seed):
    q, bias, x = _case(m, n, 64 * groups, r, torch.bfloat16, has_bias, seed)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    p = ops.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    ref = reference.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)
    for name in ops.supported_cpu_isas():
        ops.set_cpu_isa(name)
        y = torch.ops.svdquant.gemm_w4a4_packed(q_x, s_x, lora_act, p.wp, p.sw, p.lora_up, p.bias, p.n,
                                                torch.float32)  # fmt: skip
        if m:
            assert _rel(y, ref) < REL_TOL, name
    ops.set_cpu_isa(ops.supported_cpu_isas()[-1])


@pytest.mark.parametrize(("n", "k", "r"), [(1, 64, 0), (37, 192, 3), (200, 3072, 32)])
def test_pack_round_trip(n, k, r):
    """The tile layout is a pure re-arrangement: unpacking gives the canonical tensors back."""
    q, bias, _ = _case(1, n, k, r, torch.bfloat16, True)
    packed = ops.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    qweight, wscales, lora_up, b = ops.unpack_gemm_weights(*packed)
    assert torch.equal(qweight, q.qweight)
    assert torch.equal(wscales, q.wscales.float()) and torch.equal(lora_up, q.lora_up.float())
    assert torch.equal(b, bias.float())


def test_linear_uses_packed_path_and_repacks_on_change(isa):
    """SVDQuantLinear on CPU runs the packed kernel, equals the canonical ops, and repacks after its
    tensors change (load_state_dict, dtype change); the packed copy never enters the state dict."""
    torch.manual_seed(0)
    lin = SVDQuantLinear.from_linear(torch.nn.Linear(192, 70).to(torch.bfloat16), 8)
    x = torch.randn(5, 2, 192, dtype=torch.bfloat16).transpose(0, 1)  # non-contiguous [2, 5, 192]
    canonical = ops.svdquant_linear(x.reshape(-1, 192), lin.qweight, lin.wscales, lin.smooth, lin.lora_down,
                                    lin.lora_up, lin.bias).reshape(2, 5, 70)  # fmt: skip
    y = lin(x)
    assert lin._packed is not None
    assert _rel(y, canonical) < 1e-2  # bf16 output rounding of two float32 results
    assert set(lin.state_dict()) == {"qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"}

    torch.manual_seed(1)
    other = SVDQuantLinear.from_linear(torch.nn.Linear(192, 70).to(torch.bfloat16), 8)
    lin.load_state_dict(other.state_dict())
    assert torch.equal(lin(x), other(x))
    lin.to(torch.float16)
    assert lin(x.half()).dtype == torch.float16 and lin._packed[1].sw.dtype == torch.float32


def test_bad_packed_arguments_name_the_argument():
    q, bias, x = _case(3, 20, 128, 4, torch.float32, True)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    p = ops.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    op = torch.ops.svdquant.gemm_w4a4_packed
    with pytest.raises(ValueError, match="sw is"):
        op(q_x, s_x, lora_act, p.wp, p.sw[:, :1], p.lora_up, p.bias, p.n, torch.float32)
    with pytest.raises(ValueError, match="wp is"):
        op(q_x, s_x, lora_act, p.wp, p.sw, p.lora_up, p.bias, p.n + 16, torch.float32)
    with pytest.raises(ValueError, match="bias is"):
        op(q_x, s_x, lora_act, p.wp, p.sw, p.lora_up, p.bias[:-1], p.n, torch.float32)
    with pytest.raises(ValueError, match="lora_act is"):
        op(q_x, s_x, lora_act[:, :2], p.wp, p.sw, p.lora_up, p.bias, p.n, torch.float32)


def test_int8_peak_microbenchmark():
    if "avx2" not in ops.supported_cpu_isas():
        assert ops.int8_peak_gops(1) == 0.0
        return
    assert ops.int8_peak_gops(1) > 0
    with pytest.raises(ValueError, match="num_threads"):
        ops._C.int8_peak_gops(0)


@pytest.mark.parametrize(("m", "n", "k", "r"), [(1, 200, 3072, 32), (257, 7, 192, 1), (17, 1, 3072, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_packed_linear_matches_reference(isa, m, n, k, r, dtype):
    """quantize_act + packed GEMM on a non-contiguous x equals reference.svdquant_linear (same codes;
    float32 accumulation order only, then one rounding to the output dtype)."""
    q, bias, x = _case(2 * m, n, k, r, dtype, has_bias=True)
    x = x[::2]  # non-contiguous rows
    p = ops.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    y = ops.svdquant_linear_packed(x, q.smooth, q.lora_down, p)
    ref = reference.svdquant_linear(x, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    # fp32: the GEMM tolerance; 16-bit: two roundings of nearly equal float32 values to the dtype.
    assert _rel(y, ref) < (REL_TOL if dtype == torch.float32 else 1e-2)
