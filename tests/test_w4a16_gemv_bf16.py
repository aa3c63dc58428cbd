"""The bfloat16 W4A16 GEMV (``_C.linear_w4a16(..., bf16=True)``) of every x86 path but generic, called directly
(row counts beyond those the op hands it too) and through the op: on zmm (cpp/cpu/w4a16_gemv_bf16.cpp: avx512vnni,
avx512bf16, amx; a pair of groups per vector) and on ymm (cpp/cpu/w4a16_gemv_fixed_ymm.inc: avx2 with vpmaddubsw,
avxvnni with vpdpbusd; a group per vector).

It puts x̂ = x / smooth (float32) in 16-bit fixed point per row and group of 64 (``reference.quantize_fixed16``)
and rounds nothing else: W = q·s + m, lora_act (from the float32 x̂), lora_up and the bias stay exact, products
exact in int32, the rest in float32. Two checks per case:

* against the float64 result of that very computation (x̃ = codes · step first): the float32 kernel's
  tolerance, ``1e-5 · bound`` (tests/test_weight_only.py), with ``bound`` over x̃. This is tight: a wrong
  nibble, byte, lane, group, step, scale or minimum shows, and so would a rounding of W or of the low-rank branch;
* against the exact float64 result (``reference.linear_w4a16``'s): ``FIXED16_TOL · fixed_bound + 1e-5 · bound``,
  ``fixed_bound = Σ_g amax_g · Σ_{k in g} |W_k|`` (x̃ errs by at most half a step, amax / 65278 per element,
  and float32's roundings of 32639 / amax and of x̂ times it add a few 2⁻²⁴ of amax),
  the op's ``gemv_bf16`` regime's tolerance (tests/test_weight_only.py holds it to the looser bfloat16 one).

Shapes cover the kernel's edges: register blocks of 4 rows (M = 0, 1, 2, 3, 4, 5, 12, 17), pairs of groups
(K / 64 odd: a last pair of one group; K = 0), K blocks (K = 12288: one block at 1 row, several at 3), panels of 16
columns (N tails), R = 0 / 32 / 40 (a tail of the 16- and 8-lane vectors), bias or none, 1 and 2 threads; and groups at
the fixed point's edges: all zero, below ``FIXED16_TINY``, infinite or NaN, an outlier beside tiny elements.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_weight_only import F32_TOL, G, assert_close, make_case, on_isa

from diffusers_svdquant import ops, reference
from diffusers_svdquant.ops import native, weight_only

GEMV_PATHS = ("avx2", "avxvnni", "avx512vnni", "avx512bf16", "amx")
PATHS = [i for i in ops.supported_cpu_isas() if i in GEMV_PATHS]
WITHOUT = [i for i in ops.supported_cpu_isas() if i not in GEMV_PATHS]
pytestmark = pytest.mark.skipif(not PATHS, reason="no x86 SIMD CPU path (AVX2) on this CPU or build")
FIXED16_TOL = 0.5 / reference.FIXED16_MAX + 2.0**-22  # half a step, and the float32 scaling's roundings


@pytest.fixture(params=PATHS or ["none"])
def path(request):
    with on_isa(request.param) as name:
        yield name


def gemv_bf16(case, threads=2, **over):
    """``_C.linear_w4a16(..., bf16=True)`` on the case (every float tensor bfloat16)."""
    x, qw, ws, wm, sm, ld, lu, b = case
    (m, k), n, r = x.shape, qw.shape[0], ld.shape[1]
    y = torch.empty(m, n, dtype=x.dtype)
    args = dict(
        x=x.data_ptr(), smooth=sm.data_ptr(), lora_down=ld.data_ptr(), qweight=qw.data_ptr(),
        wscales=ws.data_ptr(), wmins=wm.data_ptr(), lora_up=lu.data_ptr(), bias=0 if b is None else b.data_ptr(),
        y=y.data_ptr(), M=m, N=n, K=k, R=r, dtype=native.DTYPE_CODES[x.dtype], num_threads=threads, bf16=True,
    )  # fmt: skip
    args.update(over)
    native._C.linear_w4a16(**args)
    return y


def fixed_exact(case):
    """The float64 result of x̃ (x̂ in fixed point, reference.quantize_fixed16) times the exact W, + lora_act (from
    the float32 x̂) · lora_up + bias, and its ``bound``."""
    x, qw, ws, wm, sm, ld, lu, b = case
    xf = x.float() / sm.float()
    m, k = xf.shape
    codes, steps = reference.quantize_fixed16(xf)
    xt = (codes.double().reshape(m, k // G, G) * steps.double().unsqueeze(-1)).reshape(m, k)
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qw), ws, wm).double()
    la = xf.double() @ ld.double()
    bias = torch.zeros(qw.shape[0], dtype=torch.float64) if b is None else b.double()
    y = xt @ w.t() + la @ lu.double().t() + bias
    bound = xt.abs() @ w.abs().t() + la.abs() @ lu.double().abs().t() + bias.abs()
    return y, bound


def exact_with_fixed_bound(case):
    """The exact float64 result (reference.linear_w4a16's arithmetic), its ``bound`` and ``fixed_bound``."""
    x, qw, ws, wm, sm, ld, lu, b = case
    xh = x.double() / sm.double()
    m, k = xh.shape
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qw), ws, wm).double()
    la = xh @ ld.double()
    bias = torch.zeros(qw.shape[0], dtype=torch.float64) if b is None else b.double()
    y = xh @ w.t() + la @ lu.double().t() + bias
    bound = xh.abs() @ w.abs().t() + la.abs() @ lu.double().abs().t() + bias.abs()
    amax = xh.abs().reshape(m, k // G, G).amax(-1) if k else xh.new_zeros(m, 0)
    fixed_bound = amax @ w.abs().reshape(w.shape[0], -1, G).sum(-1).t() if k else torch.zeros_like(y)
    return y, bound, fixed_bound


def check_gemv(case, threads=2):
    y = gemv_bf16(case, threads)
    truth, bound = fixed_exact(case)
    assert_close(y, truth, F32_TOL * bound, torch.bfloat16)
    truth, bound, fixed_bound = exact_with_fixed_bound(case)
    assert_close(y, truth, FIXED16_TOL * fixed_bound + F32_TOL * bound, torch.bfloat16)
    return y


@pytest.mark.parametrize("r", [0, 32, 40])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (7, 128), (33, 192), (200, 3072), (37, 3136)])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 12, 17])
def test_gemv_bf16_matches_exact(path, m, n, k, r):
    check_gemv(make_case(m, n, k, r, torch.bfloat16, (m + n + r) % 2 == 1, m * 7 + n + k))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("m", "k"), [(1, 12288), (3, 12288), (2, 12224)])
def test_gemv_bf16_wide_k(path, threads, m, k):
    # FLUX's MLP down projection: one K block at 1 row, several at 3; 12224 = 191 groups, an odd count.
    check_gemv(make_case(m, 37, k, 32, torch.bfloat16, m % 2 == 0, seed=m + threads), threads)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(0, 9), n=st.integers(1, 40), groups=st.integers(1, 9), r=st.integers(0, 20),
    threads=st.integers(1, 3), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_gemv_bf16_hypothesis(m, n, groups, r, threads, scale, seed):
    # Any shape and magnitude (x scaled from near bfloat16's smallest normals to near its largest useful ones).
    x, *rest = make_case(m, n, groups * G, r, torch.bfloat16, seed % 2 == 0, seed)
    case = ((x.float() * scale).bfloat16(), *rest)
    for name in PATHS:
        with on_isa(name):
            check_gemv(case, threads)


@pytest.mark.parametrize("r", [0, 5])
def test_gemv_bf16_empty_k(path, r):
    # K = 0: no codes, lora_act zero; y is the bias, as the reference says.
    case = make_case(2, 20, 0, r, torch.bfloat16, True, seed=r)
    assert torch.equal(reference.linear_w4a16(*case), case[-1].expand(2, 20))
    assert torch.equal(gemv_bf16(case), case[-1].expand(2, 20))
    assert torch.equal(ops.linear_w4a16(*case), case[-1].expand(2, 20))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_gemv_bf16_thread_counts(path, threads):
    # More threads than panels or cores (3 panels of 16 columns): the same result.
    case = make_case(1, 40, 320, 8, torch.bfloat16, seed=5)
    ys = [check_gemv(case, t) for t in (1, threads)]
    assert torch.equal(ys[0], ys[1])


def test_gemv_bf16_non_contiguous_x(path):
    x, *rest = make_case(1, 33, 256, 16, torch.bfloat16, seed=2)
    xv = torch.cat([x, torch.zeros(1, 64, dtype=x.dtype)], dim=1)[:, :256]
    xs = torch.stack([x, torch.zeros_like(x)], dim=1).reshape(2, 256)[::2]
    y = ops.linear_w4a16(x, *rest)
    assert torch.equal(y, gemv_bf16((x, *rest), torch.get_num_threads()))
    for v in (xv, xs, x.t().contiguous().t()):
        assert torch.equal(ops.linear_w4a16(v, *rest), y)


@pytest.mark.parametrize("m", [1, 3])
def test_op_takes_gemv_bf16_for_few_bf16_rows(path, m):
    assert weight_only.cpu_regime(m, torch.bfloat16) == "gemv_bf16"
    # float32 and float16 keep the float32 kernel, its arithmetic and tolerance.
    for dtype in (torch.float32, torch.float16):
        assert weight_only.cpu_regime(m, dtype) == "gemv"
        case = make_case(m, 30, 192, 8, dtype, seed=m)
        truth, bound, _ = exact_with_fixed_bound(case)
        assert_close(ops.linear_w4a16(*case), truth, F32_TOL * bound, dtype)
    case = make_case(m, 30, 192, 8, torch.bfloat16, seed=m)
    assert torch.equal(ops.linear_w4a16(*case), gemv_bf16(case, torch.get_num_threads()))
    # bfloat16 x with float32 parameters: the float32 kernel (tests/test_weight_only.py test_mixed_dtypes).


@pytest.mark.parametrize("isa", WITHOUT)
def test_paths_without_vnni_keep_the_float32_gemv(isa):
    with on_isa(isa):
        assert weight_only.cpu_regime(1, torch.bfloat16) == "gemv"
        assert not native._C.w4a16_bf16_gemv_available()


def test_gemv_bf16_is_the_float32_kernel_on_the_fixed_point_x(path):
    # The float32 kernel (bf16=False) fed x̃ itself (codes · step, exact in float32, smooth 1) computes what
    # this one does: they agree to float32 summation order, so the fixed point is the only rounding.
    x, qw, ws, wm, sm, ld, lu, b = make_case(3, 50, 320, 0, torch.bfloat16, seed=11)
    case = (x, qw, ws, wm, sm, ld, lu, b)
    codes, steps = reference.quantize_fixed16(x.float() / sm.float())
    xt = (codes.float().reshape(3, -1, G) * steps.unsqueeze(-1)).reshape(3, 320)
    y = gemv_bf16(case)
    y32 = torch.empty(3, 50)
    f32 = [t.float().contiguous() for t in (ws, wm, ld, lu, b)]
    ones = torch.ones(320)
    native._C.linear_w4a16(
        xt.data_ptr(), ones.data_ptr(), f32[2].data_ptr(), qw.data_ptr(), f32[0].data_ptr(), f32[1].data_ptr(),
        f32[3].data_ptr(), f32[4].data_ptr(), y32.data_ptr(), 3, 50, 320, 0, native.DTYPE_CODES[torch.float32], 2,
    )  # fmt: skip
    truth, bound = fixed_exact(case)
    assert_close(y32, truth, F32_TOL * bound, torch.float32)
    assert_close(y, y32.double(), F32_TOL * bound, torch.bfloat16)


def test_gemv_bf16_fixed_point_edges(path):
    # Per row: a group all zero; one below FIXED16_TINY (counts as zero); one with a 1e4 outlier beside elements
    # 1e-4 (those round to a few steps: the half-step bound, not bfloat16's relative one).
    k = 4 * G
    x, qw, ws, wm, _, ld, lu, b = make_case(3, 21, k, 4, torch.bfloat16, seed=3)
    x = x.clone()
    x[0, :G] = 0
    x[1, G : 2 * G] = 1e-35
    x[2, 2 * G : 3 * G] = 1e-4
    x[2, 2 * G + 5] = 1e4
    case = (x, qw, ws, wm, torch.ones(k, dtype=torch.bfloat16), ld, lu, b)
    codes, steps = reference.quantize_fixed16(x.float())
    assert steps[0, 0] == 0 and steps[1, 1] == 0 and not codes[0, :G].any() and not codes[1, G : 2 * G].any()
    check_gemv(case)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_gemv_bf16_non_finite_x_gives_nan_rows(path, bad):
    # A non-finite x̂ makes its row's outputs NaN (step NaN), as the float32 reference's inf · 0-scale groups
    # and NaN do; the other rows are untouched.
    x, *rest = make_case(3, 40, 192, 8, torch.bfloat16, seed=4)
    x = x.clone()
    x[1, 70] = bad
    y = gemv_bf16((x, *rest))
    assert y[1].isnan().all()
    clean = gemv_bf16((x[[0, 2]].contiguous(), *rest))
    assert torch.equal(y[[0, 2]], clean)


def test_gemv_bf16_bad_arguments(path):
    case = make_case(1, 8, 128, 4, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="bf16=True needs every float tensor in bfloat16"):
        gemv_bf16(case, dtype=native.DTYPE_CODES[torch.float32])
    # Both kernels asked for: refused, by name where the path has tiles, for want of them where it has none.
    refusal = "choose one kernel" if path in ("avx512bf16", "amx") else "has no tile kernel"
    with pytest.raises(ValueError, match=refusal):
        gemv_bf16(case, tiles=True)


@pytest.mark.parametrize("isa", WITHOUT)
def test_paths_without_it_refuse_bf16(isa):
    case = make_case(1, 8, 128, 4, torch.bfloat16, seed=1)
    with on_isa(isa), pytest.raises(ValueError, match="no bfloat16 GEMV"):
        gemv_bf16(case)


def test_gemv_bf16_constant_and_odd_groups(path):
    # Scales 0 (every group constant): y = x̃ · m summed, no NaN; 3 groups: a last pair of one group.
    n, k = 9, 3 * G
    w = torch.arange(n * k // G, dtype=torch.float32).repeat_interleave(G).reshape(n, k) / 8 - 1
    codes, ws, wm = reference.quantize_groups_affine(w, param_dtype=torch.bfloat16)
    assert not ws.any()
    x = torch.randn(1, k).bfloat16()
    z = torch.zeros(k, 0, dtype=torch.bfloat16), torch.zeros(n, 0, dtype=torch.bfloat16)
    check_gemv((x, reference.pack_int4(codes), ws, wm, torch.ones(k, dtype=torch.bfloat16), *z, None))
