"""The CPU W4A4 GEMM and whole linear (canonical weights in, every instruction path) against reference.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gemm_layout
import pytest
import torch
from branch_bound import bf16_branch, branch_bound, within
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


def _gemm_args(m, n, k, r=32, seed=0):
    """gemm_w4a4's arguments (bf16 weights with a bias, float32 output) for reference-quantized activations."""
    q, bias, x = _case(m, n, k, r, torch.bfloat16, has_bias=True, seed=seed)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    return (q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# 0..64 rows take one row chunk; 300 rows at K = 3072 take five, which 2 threads split into row
# ranges over the same panel of tiles (each thread packs its own copy). Both must equal the reference.
@pytest.mark.parametrize("m", [0, 1, 3, 17, 64, 300])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (7, 192), (200, 128), (64, 3072)])
@pytest.mark.parametrize("r", [0, 1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemm_matches_reference(isa, m, n, k, r, dtype):
    """The CPU kernel of svdquant::gemm_w4a4 (canonical weights in) equals reference.gemm_w4a4."""
    if m == 300 and k != 3072:
        pytest.skip("the multi-chunk path needs M above one chunk (64 rows at K = 3072)")
    _check_gemm(m, n, k, r, dtype)


# Few rows (M <= 8) read the canonical weights directly, no tiles: group counts past one zmm of scales
# (G = 19), ranks past one vector with tails (17, 33), column counts that are not a multiple of the 4-
# or 2-column blocks, the row blocks and their remainders, up to the threshold.
@pytest.mark.parametrize("m", [1, 4, 5, 8])
@pytest.mark.parametrize(("n", "k", "r"), [(37, 64 * 19, 17), (40, 128, 33), (5, 64, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_few_rows_match_reference(isa, m, n, k, r, dtype):
    _check_gemm(m, n, k, r, dtype)


def _check_gemm(m, n, k, r, dtype):
    q, bias, x = _case(m, n, k, r, dtype, has_bias=(m + n) % 2 == 1)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    y = torch.ops.svdquant.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)
    ref = reference.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if m:
        assert _rel(y, ref) < REL_TOL
    out = torch.ops.svdquant.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, dtype)
    assert out.dtype == dtype
    if bf16_branch(ops.cpu_isa(), m, lora_act.shape[1], dtype):  # the branch from bf16 lora_act (AMX)
        assert within(out, y, branch_bound(y, lora_act, q.lora_up))
    else:
        assert torch.equal(out, y.to(dtype))


# The micro-kernels take rows in blocks (4 on the ymm paths, 6 on the zmm one; the direct path 2 or 4
# up to 8 rows) and the last block takes whatever is left: every remainder has its own instantiation,
# so every one is run.
@pytest.mark.parametrize("m", list(range(1, 17)))
def test_every_row_block_remainder_matches_reference(isa, m):
    args = _gemm_args(m, 40, 192, r=8, seed=m)
    assert _rel(torch.ops.svdquant.gemm_w4a4(*args), reference.gemm_w4a4(*args)) < REL_TOL


@pytest.mark.parametrize(("x_code", "w_code"), [(7, -8), (-8, -8), (7, 7), (-8, 7), ("random", "random")])
@pytest.mark.parametrize(("m", "groups"), [(5, 17), (300, 40)])
def test_gemm_integer_sums_are_exact_at_the_code_limits(isa, x_code, w_code, m, groups):
    """With unit scales the output is the integer matmul of the codes, exactly: the unsigned-offset
    correction (−8·Σq_w per group) and the 16-bit partial sums of the AVX2 path hold at the extremes
    of [-8, 7]. 17 and 40 groups leave a partial K block; 300 rows take several row chunks."""
    n, k = 37, 64 * groups
    g = torch.Generator().manual_seed(1)

    def codes(v, rows):
        if v == "random":
            return torch.where(torch.rand(rows, k, generator=g) < 0.5, -8, 7).to(torch.int8)
        return torch.full((rows, k), v, dtype=torch.int8)

    cx, cw = codes(x_code, m), codes(w_code, n)
    y = torch.ops.svdquant.gemm_w4a4(
        reference.pack_int4(cx), torch.ones(m, groups), reference.pack_int4(cw), torch.ones(n, groups),
        torch.zeros(m, 0), torch.zeros(n, 0), None, torch.float32,
    )  # fmt: skip
    assert torch.equal(y, (cx.long() @ cw.long().T).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_output_is_rounded_as_torch_rounds(isa, dtype):
    """The kernels write bf16 / fp16 themselves: bit for bit torch's round-to-nearest-even of the
    float32 result, at ties, subnormals, overflow to infinity and NaN (outputs = bias: zero codes)."""
    one = 1.0
    values = [one + 2**-8, one + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 65504.0, 65519.0, 65520.0,
              1e5, 3e38, 1e-6, 6e-8, 2e-8, 1e-40, -2.5e-7, -(one + 2**-8), 0.0, -0.0, float("inf"),
              float("-inf"), float("nan")]  # fmt: skip
    values += torch.randn(19, generator=torch.Generator().manual_seed(3)).mul(1e3).tolist()
    n, k, m = len(values), 64, 3
    bias = torch.tensor(values, dtype=torch.float32)
    args = (reference.pack_int4(torch.zeros(m, k, dtype=torch.int8)), torch.ones(m, 1),
            reference.pack_int4(torch.zeros(n, k, dtype=torch.int8)), torch.ones(n, 1),
            torch.zeros(m, 0), torch.zeros(n, 0), bias)  # fmt: skip
    y32 = torch.ops.svdquant.gemm_w4a4(*args, torch.float32)
    out = torch.ops.svdquant.gemm_w4a4(*args, dtype)
    want = y32.to(dtype)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(1, 70), groups=st.integers(1, 6), r=st.integers(0, 9),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_gemm_hypothesis(m, n, groups, r, has_bias, seed):
    q, bias, x = _case(m, n, 64 * groups, r, torch.bfloat16, has_bias, seed)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    ref = reference.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)
    for name in ops.supported_cpu_isas():
        ops.set_cpu_isa(name)
        y = torch.ops.svdquant.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, torch.float32)
        if m:
            assert _rel(y, ref) < REL_TOL, name
    ops.set_cpu_isa(ops.supported_cpu_isas()[-1])


def _gemm_and_reference(m, n, k, seed):
    args = _gemm_args(m, n, k, seed=seed)
    return torch.ops.svdquant.gemm_w4a4(*args), reference.gemm_w4a4(*args)


def test_gemm_scratch_is_per_thread_and_reused_safely(isa):
    """The unpacked activations live in a per-thread block kept between calls: calls that grow and
    shrink it in one thread, and calls from several threads at once (the GIL is released), must each
    see only their own rows."""
    shapes = [(300, 64, 3072), (5, 40, 192), (129, 33, 1024), (1, 16, 64), (300, 64, 3072)]
    for i, (m, n, k) in enumerate(shapes):
        y, ref = _gemm_and_reference(m, n, k, seed=i)
        assert _rel(y, ref) < REL_TOL, (m, n, k)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: _gemm_and_reference(*a[1], seed=100 + a[0]), enumerate(shapes * 2)))
    for (m, n, k), (y, ref) in zip(shapes * 2, results, strict=True):
        assert _rel(y, ref) < REL_TOL, (m, n, k)


@pytest.mark.parametrize(("n", "k", "r"), [(1, 64, 0), (37, 192, 3), (200, 3072, 32), (16, 128, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_bias", [True, False])
def test_native_tiles_equal_the_layout_spec(isa, n, k, r, dtype, has_bias):
    """Each path's pack_tile (canonical weights -> kernel tiles) builds exactly gemm_layout.pack_gemm_weights'
    layout: codes, their sums, scales, lora_up and bias, padding columns included."""
    q, bias, _ = _case(1, n, k, r, dtype, has_bias)
    want = gemm_layout.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    got = gemm_layout.native_gemm_tiles(q.qweight, q.wscales, q.lora_up, bias)
    assert torch.equal(got.wq, want.wq) and torch.equal(got.wsum, want.wsum)
    assert torch.equal(got.sw, want.sw) and torch.equal(got.lora_up, want.lora_up)
    assert torch.equal(got.bias, want.bias) if has_bias else bool((got.bias == 0).all())


@pytest.mark.parametrize(("n", "k", "r"), [(1, 64, 0), (37, 192, 3), (200, 3072, 32)])
def test_pack_round_trip(n, k, r):
    """The tile layout is a pure re-arrangement: unpacking gives the canonical tensors back."""
    q, bias, _ = _case(1, n, k, r, torch.bfloat16, True)
    packed = gemm_layout.pack_gemm_weights(q.qweight, q.wscales, q.lora_up, bias)
    qweight, wscales, lora_up, b = gemm_layout.unpack_gemm_weights(*packed)
    assert torch.equal(qweight, q.qweight)
    # The stored sums are −8·Σ of each column's codes per group; padding columns hold 0.
    sums = -8 * reference.unpack_int4(q.qweight).view(n, k // 64, 64).sum(-1)
    wsum = packed.wsum.transpose(1, 2).reshape(-1, k // 64)
    assert torch.equal(wsum[:n].long(), sums) and not wsum[n:].any()
    assert torch.equal(wscales, q.wscales.float()) and torch.equal(lora_up, q.lora_up.float())
    assert torch.equal(b, bias.float())


def test_linear_keeps_no_second_copy_and_follows_its_tensors(isa):
    """SVDQuantLinear on CPU runs the native linear on its canonical tensors: no packed copy is kept
    (the module holds exactly the state dict's bytes), and new tensors (load_state_dict, .to) are used
    at once."""
    torch.manual_seed(0)
    lin = SVDQuantLinear.from_linear(torch.nn.Linear(192, 70).to(torch.bfloat16), 8)
    x = torch.randn(5, 2, 192, dtype=torch.bfloat16).transpose(0, 1)  # non-contiguous [2, 5, 192]
    want = reference.svdquant_linear(x.reshape(-1, 192), lin.qweight, lin.wscales, lin.smooth, lin.lora_down,
                                     lin.lora_up, lin.bias).reshape(2, 5, 70)  # fmt: skip
    before = {k: v.clone() for k, v in vars(lin).items() if isinstance(v, torch.Tensor)}
    y = lin(x)
    assert _rel(y, want) < 1e-2  # bf16 output rounding of two float32 results
    assert {k for k, v in vars(lin).items() if isinstance(v, torch.Tensor)} == set(before)
    assert not any(isinstance(v, tuple) for k, v in vars(lin).items() if "pack" in k and v is not None)
    held = sum(t.numel() * t.element_size() for t in lin.parameters())
    assert held == sum(t.numel() * t.element_size() for t in lin.state_dict().values())

    torch.manual_seed(1)
    other = SVDQuantLinear.from_linear(torch.nn.Linear(192, 70).to(torch.bfloat16), 8)
    lin.load_state_dict(other.state_dict())
    assert torch.equal(lin(x), other(x))
    lin.to(torch.float16)
    assert lin(x.half()).dtype == torch.float16


def test_bad_arguments_name_the_argument():
    q, bias, x = _case(3, 20, 128, 4, torch.float32, True)
    q_x, s_x, lora_act = reference.quantize_act(x, q.smooth, q.lora_down)
    gemm, lin = torch.ops.svdquant.gemm_w4a4, torch.ops.svdquant.linear
    with pytest.raises(ValueError, match="s_w has shape"):
        gemm(q_x, s_x, q.qweight, q.wscales[:, :1], lora_act, q.lora_up, bias, torch.float32)
    with pytest.raises(ValueError, match="bias has shape"):
        gemm(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias[:-1], torch.float32)
    with pytest.raises(ValueError, match="lora_act has shape"):
        gemm(q_x, s_x, q.qweight, q.wscales, lora_act[:, :2], q.lora_up, bias, torch.float32)
    with pytest.raises(ValueError, match=r"qweight has shape \(20, 32\), expected \[N, 64\]"):
        lin(x, q.qweight[:, :32], q.wscales, q.smooth, q.lora_down, q.lora_up, bias)
    with pytest.raises(ValueError, match="wscales has shape"):
        lin(x, q.qweight, q.wscales[:1], q.smooth, q.lora_down, q.lora_up, bias)
    with pytest.raises(ValueError, match="lora_up has shape"):
        lin(x, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up[:, :1], bias)
    with pytest.raises(ValueError, match="smooth has shape"):
        lin(x, q.qweight, q.wscales, q.smooth[:64], q.lora_down, q.lora_up, bias)
    with pytest.raises(ValueError, match="gemm_w4a4: qweight is a null pointer but holds 32 elements"):
        ops.native._C.gemm_w4a4(1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 64, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="q_x must be a non-negative address"):
        ops.native._C.gemm_w4a4(-1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 64, 0, 0, 0, 1)
    with pytest.raises(ValueError, match=r"ydtype must be 0 \(float32\), 1 \(bfloat16\) or 2 \(float16\), got 3"):
        ops.native._C.gemm_w4a4(1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 64, 0, 0, 3, 1)
    with pytest.raises(ValueError, match="wdtype"):
        ops.native._C.linear(1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 64, 0, 7, 1)


@pytest.mark.parametrize("m", [3, 16, 130])
def test_gemm_is_the_same_for_every_thread_count(isa, m):
    """Each output is computed by one thread in a fixed order, whatever the split (direct path for few
    rows, tiles over row chunks and panels otherwise): 1, 2, 3 and 8 threads give identical bits."""
    args = _gemm_args(m, 200, 3072)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs.append(torch.ops.svdquant.gemm_w4a4(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert _rel(outs[0], reference.gemm_w4a4(*args)) < REL_TOL


@pytest.mark.parametrize("m", [1, 3, 20])
def test_gemm_with_no_groups_is_the_low_rank_term_and_bias(isa, m):
    """K = 0 (no groups): no dot products, the output is lora_act @ lora_up.T + bias, on the direct
    path (few rows) and the tile path alike."""
    g = torch.Generator().manual_seed(m)
    q_x, s_x = torch.zeros(m, 0, dtype=torch.uint8), torch.zeros(m, 0)
    q_w, s_w = torch.zeros(5, 0, dtype=torch.uint8), torch.zeros(5, 0)
    args = (q_x, s_x, q_w, s_w, torch.randn(m, 4, generator=g), torch.randn(5, 4, generator=g),
            torch.randn(5, generator=g), torch.float32)  # fmt: skip
    y = torch.ops.svdquant.gemm_w4a4(*args)
    assert _rel(y, reference.gemm_w4a4(*args)) < REL_TOL


def test_int8_peak_microbenchmark():
    if "avx2" not in ops.supported_cpu_isas():
        assert ops.int8_peak_gops(1) == 0.0
        return
    assert ops.int8_peak_gops(1) > 0
    with pytest.raises(ValueError, match="num_threads"):
        ops.native._C.int8_peak_gops(0)


@pytest.mark.parametrize(
    ("m", "n", "k", "r"), [(1, 200, 3072, 32), (257, 7, 192, 1), (17, 1, 3072, 0), (300, 40, 3072, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_linear_matches_reference(isa, m, n, k, r, dtype):
    """The one-call native linear (quantize_act + GEMM) on a non-contiguous x equals
    reference.svdquant_linear (same codes; float32 accumulation order only, then one rounding)."""
    q, bias, x = _case(2 * m, n, k, r, dtype, has_bias=True)
    x = x[::2]  # non-contiguous rows
    y = ops.svdquant_linear(x, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, bias)
    ref = reference.svdquant_linear(x, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    # fp32: the GEMM tolerance; 16-bit: two roundings of nearly equal float32 values to the dtype.
    assert _rel(y, ref) < (REL_TOL if dtype == torch.float32 else 1e-2)


def test_mixed_dtypes_compute_in_float32(isa):
    """Weights in one dtype and activations in another: the op computes in float32 (exact for every
    16-bit input), so the result is the reference's."""
    q, bias, x = _case(9, 40, 192, 4, torch.bfloat16, True)
    xf = x.float()
    y = ops.svdquant_linear(xf, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, bias)
    ref = reference.svdquant_linear(xf, q.qweight, q.wscales, q.smooth, q.lora_down, q.lora_up, bias)
    assert y.dtype == torch.float32 and _rel(y, ref) < REL_TOL
