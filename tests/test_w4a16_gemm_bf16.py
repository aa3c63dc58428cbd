"""The many-rows fixed-point bfloat16 W4A16 GEMM (``_C.linear_w4a16(..., gemm=True)``; cpp/cpu/w4a16_gemm_fixed.inc)
of the avxvnni path (ymm, 6 rows x 16 columns per register block) and the AVX-512 paths (zmm, 12 rows x 32
columns), called directly (any row count) and through the op, whose ``gemm_bf16`` regime it is where torch's
bfloat16 GEMM is emulated.

It computes what the bfloat16 GEMVs compute (tests/test_w4a16_gemv_bf16.py): x̂ = x / smooth in 16-bit fixed
point per row and group of 64 (``reference.quantize_fixed16``), the exact W, lora_act from the float32 x̂ (here
the binding's, through the path's quantize_act), products exact in int32, sums in float32. The same two checks:
against the float64 result of that computation (the float32 tolerance, ``1e-5 · bound``: a wrong nibble, byte,
lane, column, group, step, scale, minimum or row shows) and against the exact result (the fixed point's bound);
and against the GEMV itself, to the float32 tolerance.

Shapes cover the kernel's edges: register blocks of rows (M = 0, 1, 5, 6, 7, 11, 12, 13, 25, 40: tails of 6 and
12), blocks of 192 rows (200, 781), panels of 16 and 32 columns (N tails, N below one panel) in steps of 4 (N = 300:
10 and 19 panels, partial last steps), chunks of 8 groups (K / 64 = 1, 3, 8, 9, 49, 191, 192), R = 0 / 32 / 40,
bias or none, 1 to 8 threads; groups at the fixed point's edges (zero, below FIXED16_TINY, a 1e4 outlier beside
1e-4 elements, infinite or NaN).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_w4a16_gemv_bf16 import FIXED16_TOL, exact_with_fixed_bound, fixed_exact, gemv_bf16
from test_weight_only import F32_TOL, G, assert_close, make_case, on_isa

from diffusers_svdquant import ops, reference
from diffusers_svdquant.ops import native, weight_only

GEMM_PATHS = ("avxvnni", "avx512vnni", "avx512bf16", "amx")
PATHS = [i for i in ops.supported_cpu_isas() if i in GEMM_PATHS]
WITHOUT = [i for i in ops.supported_cpu_isas() if i not in GEMM_PATHS]
pytestmark = pytest.mark.skipif(not PATHS, reason="no VNNI CPU path (AVX-VNNI or AVX512-VNNI) on this CPU or build")


@pytest.fixture(params=PATHS or ["none"])
def path(request):
    with on_isa(request.param) as name:
        yield name


def gemm_bf16(case, threads=2, **over):
    """``_C.linear_w4a16(..., gemm=True)`` on the case (every float tensor bfloat16)."""
    return gemv_bf16(case, threads, **{"bf16": False, "gemm": True, **over})


def check_gemm(case, threads=2):
    y = gemm_bf16(case, threads)
    truth, bound = fixed_exact(case)
    assert_close(y, truth, F32_TOL * bound, torch.bfloat16)
    truth, bound, fixed_bound = exact_with_fixed_bound(case)
    assert_close(y, truth, FIXED16_TOL * fixed_bound + F32_TOL * bound, torch.bfloat16)
    return y


@pytest.mark.parametrize("r", [0, 32, 40])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (7, 192), (33, 512), (70, 576), (37, 3136)])
@pytest.mark.parametrize("m", [0, 1, 5, 6, 7, 11, 12, 13, 25, 40])
def test_gemm_bf16_matches_exact(path, m, n, k, r):
    check_gemm(make_case(m, n, k, r, torch.bfloat16, (m + n + r) % 2 == 1, m * 7 + n + k))


@pytest.mark.parametrize(("m", "n"), [(3, 50), (17, 96), (30, 33)])
def test_gemm_bf16_agrees_with_the_gemv(path, m, n):
    # The same rounded x̂ and integer products: the two kernels differ only in float32 summation order.
    case = make_case(m, n, 640, 16, torch.bfloat16, m % 2 == 0, seed=m)
    _, bound = fixed_exact(case)
    assert_close(gemm_bf16(case), gemv_bf16(case).double(), F32_TOL * bound, torch.bfloat16)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("m", "k"), [(13, 12288), (20, 12224), (64, 3072), (200, 128), (781, 64)])
def test_gemm_bf16_wide_k(path, threads, m, k):
    # FLUX's MLP down projection (24 chunks of 8 groups), 191 groups (a last chunk of 7), its MLP up input; blocks of
    # 192 rows: 200 (a block of 8 after one), 781 (five blocks, the last of 13: a register block's tail).
    check_gemm(make_case(m, 300, k, 32, torch.bfloat16, m % 2 == 0, seed=m + threads), threads)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 40), n=st.integers(1, 70), groups=st.integers(1, 19), r=st.integers(0, 20),
    threads=st.integers(1, 3), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_gemm_bf16_hypothesis(m, n, groups, r, threads, scale, seed):
    x, *rest = make_case(m, n, groups * G, r, torch.bfloat16, seed % 2 == 0, seed)
    case = ((x.float() * scale).bfloat16(), *rest)
    for name in PATHS:
        with on_isa(name):
            check_gemm(case, threads)


@pytest.mark.parametrize("r", [0, 5])
def test_gemm_bf16_empty_k(path, r):
    case = make_case(14, 20, 0, r, torch.bfloat16, True, seed=r)
    assert torch.equal(gemm_bf16(case), case[-1].expand(14, 20))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_gemm_bf16_thread_counts(path, threads):
    # More threads than panels (3 of 16 columns, 2 of 32) or cores: the same result.
    case = make_case(19, 40, 320, 8, torch.bfloat16, seed=5)
    ys = [check_gemm(case, t) for t in (1, threads)]
    assert torch.equal(ys[0], ys[1])


def test_gemm_bf16_fixed_point_edges(path):
    k = 4 * G
    x, qw, ws, wm, _, ld, lu, b = make_case(15, 21, k, 4, torch.bfloat16, seed=3)
    x = x.clone()
    x[0, :G] = 0
    x[7, G : 2 * G] = 1e-35
    x[14, 2 * G : 3 * G] = 1e-4
    x[14, 2 * G + 5] = 1e4
    check_gemm((x, qw, ws, wm, torch.ones(k, dtype=torch.bfloat16), ld, lu, b))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_gemm_bf16_non_finite_x_gives_nan_rows(path, bad):
    x, *rest = make_case(14, 40, 192, 8, torch.bfloat16, seed=4)
    x = x.clone()
    x[9, 70] = bad
    y = gemm_bf16((x, *rest))
    assert y[9].isnan().all()
    keep = [i for i in range(14) if i != 9]
    assert torch.equal(y[keep], gemm_bf16((x[keep].contiguous(), *rest)))


def test_gemm_bf16_constant_groups(path):
    # Scales 0 (every group constant): y = Σ m · X_g, no NaN.
    n, k = 9, 3 * G
    w = torch.arange(n * k // G, dtype=torch.float32).repeat_interleave(G).reshape(n, k) / 8 - 1
    codes, ws, wm = reference.quantize_groups_affine(w, param_dtype=torch.bfloat16)
    assert not ws.any()
    x = torch.randn(20, k).bfloat16()
    z = torch.zeros(k, 0, dtype=torch.bfloat16), torch.zeros(n, 0, dtype=torch.bfloat16)
    check_gemm((x, reference.pack_int4(codes), ws, wm, torch.ones(k, dtype=torch.bfloat16), *z, None))


def test_gemm_bf16_bad_arguments(path):
    case = make_case(20, 8, 128, 4, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="gemm=True needs every float tensor in bfloat16"):
        gemm_bf16(case, dtype=native.DTYPE_CODES[torch.float32])
    with pytest.raises(ValueError, match="choose one kernel"):
        gemm_bf16(case, bf16=True)


@pytest.mark.parametrize("isa", WITHOUT)
def test_paths_without_it_refuse_gemm(isa):
    case = make_case(20, 8, 128, 4, torch.bfloat16, seed=1)
    with on_isa(isa):
        assert not native._C.w4a16_bf16_gemm_available()
        with pytest.raises(ValueError, match="no fixed-point bfloat16 GEMM"):
            gemm_bf16(case)


@pytest.mark.parametrize("m", [13, 40, 77])
def test_op_takes_gemm_bf16_without_bf16_hardware(path, monkeypatch, m):
    # Where torch's bfloat16 GEMM is emulated, bfloat16 rows beyond the GEMV's take the GEMM (the tile paths keep
    # their tiles from their own row count); with bfloat16 hardware they do not.
    monkeypatch.setattr(weight_only, "_bf16_in_hardware", False)
    case = make_case(m, 30, 192, 8, torch.bfloat16, seed=m)
    regime = weight_only.cpu_regime(m, torch.bfloat16)
    if path in weight_only.TILES_AFTER_ROWS:
        assert regime == "tiles"
    else:
        assert regime == "gemm_bf16"
        assert weight_only.cpu_regime(weight_only.GEMM_BF16_AFTER_ROWS, torch.bfloat16) == "gemv_bf16"
        assert torch.equal(ops.linear_w4a16(*case), gemm_bf16(case, torch.get_num_threads()))
        xv = torch.cat([case[0], torch.zeros(m, 64, dtype=torch.bfloat16)], dim=1)[:, :192]  # non-contiguous
        assert torch.equal(ops.linear_w4a16(xv, *case[1:]), gemm_bf16(case, torch.get_num_threads()))
    for dtype in (torch.float32, torch.float16):
        assert weight_only.cpu_regime(m, dtype) != "gemm_bf16"
    monkeypatch.setattr(weight_only, "_bf16_in_hardware", True)
    assert weight_only.cpu_regime(m, torch.bfloat16) != "gemm_bf16"


def test_op_gemm_bf16_with_float32_parameters_takes_float32_panels(path, monkeypatch):
    # One float32 parameter puts the native call in float32, which the GEMM does not take: the float32 panels do
    # it, to the float32 tolerance.
    monkeypatch.setattr(weight_only, "_bf16_in_hardware", False)
    x, qw, ws, wm, sm, ld, lu, b = make_case(20, 24, 256, 8, torch.bfloat16, seed=6)
    case = (x, qw, ws, wm, sm, ld, lu, b.float())
    if path in weight_only.TILES_AFTER_ROWS:  # the tile kernel takes these rows, rounding to bfloat16
        assert weight_only.cpu_regime(20, torch.bfloat16) == "tiles"
        return
    truth, bound, _ = exact_with_fixed_bound(case)
    assert_close(ops.linear_w4a16(*case), truth, F32_TOL * bound, torch.bfloat16)
