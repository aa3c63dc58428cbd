"""The bfloat16 W4A16 GEMV (``_C.linear_w4a16(..., bf16=True)``, cpp/cpu/w4a16_gemv_bf16.cpp) of the amx path,
called directly (row counts beyond those the op hands it too) and through the op.

It rounds x̂ = x / smooth (float32) to bfloat16 and nothing else: W = q·s + m, lora_act (from the float32 x̂),
lora_up and the bias stay exact, products and sums in float32. Two checks per case:

* against the float64 result of that very computation (x̂ rounded to bfloat16 first): the float32 kernel's
  tolerance, ``1e-5 · bound`` (tests/test_weight_only.py), with ``bound`` over the rounded x̂. This is tight: a
  wrong nibble, lane, group, scale or minimum shows, and so would a rounding of W or of the low-rank branch;
* against the exact float64 result (``reference.linear_w4a16``'s): ``BF16_GEMV_TOL · spread + 1e-5 · bound``,
  the bfloat16-linear tolerance derived in tests/test_weight_only.py, which the op's ``gemv_bf16`` regime is
  held to there as well.

Shapes cover the kernel's edges: register blocks of 4 rows (M = 0, 1, 2, 3, 4, 5, 12, 17), pairs of groups
(K / 64 odd: a last pair of one group; K = 0), K blocks (K = 12288: one block at 1 row, several at 3), panels of 16
columns (N tails), R = 0 / 32 / 40 (a tail of the 16-lane vectors), bias or none, 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch
from test_weight_only import BF16_GEMV_TOL, BF16_NORM_TOL, F32_TOL, G, assert_close, exact, make_case, on_isa

from diffusers_svdquant import ops, reference
from diffusers_svdquant.ops import native, weight_only

AMX = [i for i in ops.supported_cpu_isas() if i == "amx"]
pytestmark = pytest.mark.skipif(not AMX, reason="no amx CPU path (AVX512-BF16) on this CPU or build")


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


def rounded_exact(case):
    """The float64 result of x̂ rounded to bfloat16 times the exact W, + lora_act (from the float32 x̂) · lora_up
    + bias, and its ``bound``."""
    x, qw, ws, wm, sm, ld, lu, b = case
    xf = x.float() / sm.float()
    xh = xf.bfloat16().double()
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qw), ws, wm).double()
    la = xf.double() @ ld.double()
    bias = torch.zeros(qw.shape[0], dtype=torch.float64) if b is None else b.double()
    y = xh @ w.t() + la @ lu.double().t() + bias
    bound = xh.abs() @ w.abs().t() + la.abs() @ lu.double().abs().t() + bias.abs()
    return y, bound


def check_gemv(case, threads=2):
    with on_isa("amx"):
        y = gemv_bf16(case, threads)
    truth, bound = rounded_exact(case)
    assert_close(y, truth, F32_TOL * bound, torch.bfloat16)
    truth, bound, spread = exact(*case)
    assert_close(y, truth, BF16_GEMV_TOL * spread + F32_TOL * bound, torch.bfloat16, BF16_NORM_TOL, norm_ref=spread)
    return y


@pytest.mark.parametrize("r", [0, 32, 40])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (7, 128), (33, 192), (200, 3072), (37, 3136)])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 12, 17])
def test_gemv_bf16_matches_exact(m, n, k, r):
    check_gemv(make_case(m, n, k, r, torch.bfloat16, (m + n + r) % 2 == 1, m * 7 + n + k))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("m", "k"), [(1, 12288), (3, 12288), (2, 12224)])
def test_gemv_bf16_wide_k(threads, m, k):
    # FLUX's MLP down projection: one K block at 1 row, several at 3; 12224 = 191 groups, an odd count.
    check_gemv(make_case(m, 37, k, 32, torch.bfloat16, m % 2 == 0, seed=m + threads), threads)


@pytest.mark.parametrize("r", [0, 5])
def test_gemv_bf16_empty_k(r):
    # K = 0: no codes, lora_act zero; y is the bias, as the reference says.
    case = make_case(2, 20, 0, r, torch.bfloat16, True, seed=r)
    assert torch.equal(reference.linear_w4a16(*case), case[-1].expand(2, 20))
    with on_isa("amx"):
        assert torch.equal(gemv_bf16(case), case[-1].expand(2, 20))
        assert torch.equal(ops.linear_w4a16(*case), case[-1].expand(2, 20))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_gemv_bf16_thread_counts(threads):
    # More threads than panels or cores (3 panels of 16 columns): the same result.
    case = make_case(1, 40, 320, 8, torch.bfloat16, seed=5)
    ys = [check_gemv(case, t) for t in (1, threads)]
    assert torch.equal(ys[0], ys[1])


def test_gemv_bf16_non_contiguous_x():
    x, *rest = make_case(1, 33, 256, 16, torch.bfloat16, seed=2)
    xv = torch.cat([x, torch.zeros(1, 64, dtype=x.dtype)], dim=1)[:, :256]
    xs = torch.stack([x, torch.zeros_like(x)], dim=1).reshape(2, 256)[::2]
    with on_isa("amx"):
        y = ops.linear_w4a16(x, *rest)
        assert torch.equal(y, gemv_bf16((x, *rest), torch.get_num_threads()))
        for v in (xv, xs, x.t().contiguous().t()):
            assert torch.equal(ops.linear_w4a16(v, *rest), y)


@pytest.mark.parametrize("m", [1, 3])
def test_op_takes_gemv_bf16_for_few_bf16_rows(m):
    with on_isa("amx"):
        assert weight_only.cpu_regime(m, torch.bfloat16) == "gemv_bf16"
        # float32 and float16 keep the float32 kernel, its arithmetic and tolerance.
        for dtype in (torch.float32, torch.float16):
            assert weight_only.cpu_regime(m, dtype) == "gemv"
            case = make_case(m, 30, 192, 8, dtype, seed=m)
            truth, bound, _ = exact(*case)
            assert_close(ops.linear_w4a16(*case), truth, F32_TOL * bound, dtype)
        case = make_case(m, 30, 192, 8, torch.bfloat16, seed=m)
        assert torch.equal(ops.linear_w4a16(*case), gemv_bf16(case, torch.get_num_threads()))
        # bfloat16 x with float32 parameters: the float32 kernel (tests/test_weight_only.py test_mixed_dtypes).
    with on_isa("avx512vnni"):
        assert weight_only.cpu_regime(m, torch.bfloat16) == "gemv"
        assert not native._C.w4a16_bf16_gemv_available()


def test_gemv_bf16_rounds_x_hat_only():
    # The float32 kernel (bf16=False) on the same call differs from this one exactly by x̂'s rounding: with x̂
    # already a bfloat16 value (smooth = 1, x bfloat16) the two agree to float32 summation order.
    x, qw, ws, wm, _, ld, lu, b = make_case(2, 50, 320, 8, torch.bfloat16, seed=11)
    case = (x, qw, ws, wm, torch.ones(320, dtype=torch.bfloat16), ld, lu, b)
    truth, bound, _ = exact(*case)
    with on_isa("amx"):
        y = gemv_bf16(case)
        y32 = torch.empty_like(y)
        native._C.linear_w4a16(
            x.data_ptr(), case[4].data_ptr(), ld.data_ptr(), qw.data_ptr(), ws.data_ptr(), wm.data_ptr(),
            lu.data_ptr(), b.data_ptr(), y32.data_ptr(), 2, 50, 320, 8, native.DTYPE_CODES[torch.bfloat16], 2,
        )  # fmt: skip
    for out in (y, y32):
        assert_close(out, truth, F32_TOL * bound, torch.bfloat16)


def test_gemv_bf16_bad_arguments():
    case = make_case(1, 8, 128, 4, torch.bfloat16, seed=1)
    with on_isa("amx"):
        with pytest.raises(ValueError, match="bf16=True needs every float tensor in bfloat16"):
            gemv_bf16(case, dtype=native.DTYPE_CODES[torch.float32])
        with pytest.raises(ValueError, match="choose one kernel"):
            gemv_bf16(case, tiles=True)
    with on_isa("avx512vnni"), pytest.raises(ValueError, match="no bfloat16 GEMV"):
        gemv_bf16(case)


def test_gemv_bf16_constant_and_odd_groups():
    # Scales 0 (every group constant): y = x̂ · m summed, no NaN; 3 groups: a last pair of one group.
    n, k = 9, 3 * G
    w = torch.arange(n * k // G, dtype=torch.float32).repeat_interleave(G).reshape(n, k) / 8 - 1
    codes, ws, wm = reference.quantize_groups_affine(w, param_dtype=torch.bfloat16)
    assert not ws.any()
    x = torch.randn(1, k).bfloat16()
    z = torch.zeros(k, 0, dtype=torch.bfloat16), torch.zeros(n, 0, dtype=torch.bfloat16)
    check_gemv((x, reference.pack_int4(codes), ws, wm, torch.ones(k, dtype=torch.bfloat16), *z, None))
