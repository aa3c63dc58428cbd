"""The ``torch.library`` ops of ``diffusers_svdquant.ops``: opcheck, agreement of the native ``_C`` CPU
kernels with ``reference.py``, the fallback without ``_C`` (runs ``reference.py``, warns once per op),
bad-input errors, ``torch.compile``, and the CPU ISA controls.

Tolerances: q_x and s_x must equal the reference bit for bit (docs/design.md §1; the native kernel
promises IEEE division and round-half-even). lora_act may differ by float32 summation order:
``1e-5 * (|x̂| @ |lora_down|)``. gemm output: ``1e-5 * Σ|terms| + u_out * |y|`` with ``u_out`` the
output dtype's unit roundoff (0 / 2**-8 / 2**-11 for fp32 / bf16 / fp16, plus 2**-24 absolute for
fp16 subnormals).
"""

from __future__ import annotations

import re
import time
import warnings

import pytest
import torch
from branch_bound import bf16_branch, branch_bound, within
from torch import nn

from diffusers_svdquant import SVDQuantLinear, algorithm, ops, reference

pytestmark = pytest.mark.filterwarnings("ignore:.*diffusers_svdquant._C unavailable:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Rounding two nearly equal float32 results (different accumulation orders) to a 16-bit dtype can land
# them one ulp apart when they straddle a rounding boundary: one ulp is at most 2^-7 (bf16) / 2^-10
# (fp16) of the value, plus fp16's subnormal spacing near 0.
OUT_ROUNDOFF = {
    torch.float32: (0.0, 0.0),
    torch.bfloat16: (2.0**-7, 0.0),
    torch.float16: (2.0**-10, 2.0**-24),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def native():
    """The native CPU kernels (the test is skipped when ``_C`` is not built): every kernel test here
    compares them with ``reference.py``; the fallback without ``_C`` has its own test."""
    if not ops.native_available():
        pytest.skip(f"diffusers_svdquant._C not built: {ops.native_error()}")


def _act_args(m, k, r, dtype, seed=0, transposed=False):
    g = _gen(seed)
    if transposed:
        x = (torch.randn(k, m, generator=g) * 2).to(dtype).t()  # a non-contiguous [m, k] view
    else:
        x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    smooth = (torch.rand(k, generator=g) * 2 + 0.25).to(dtype)
    lora_down = (torch.randn(k, r, generator=g) * 0.1).to(dtype)
    return x, smooth, lora_down


def _gemm_args(m, n, k, r, dtype, has_bias, seed=0):
    x, smooth, lora_down = _act_args(m, k, r, dtype, seed)
    q_x, s_x, lora_act = reference.quantize_act(x, smooth, lora_down)
    g = _gen(seed + 1)
    q_w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    s_w = (torch.rand(n, k // 64, generator=g) * 0.02).to(dtype)
    lora_up = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    return q_x, s_x, q_w, s_w, lora_act, lora_up, bias, dtype


def _linear_args(m, n, k, r, dtype, has_bias, seed=0, transposed=False):
    x, smooth, lora_down = _act_args(m, k, r, dtype, seed, transposed=transposed)
    _, _, q_w, s_w, _, lora_up, bias, _ = _gemm_args(m, n, k, r, dtype, has_bias, seed)
    return x, q_w, s_w, smooth, lora_down, lora_up, bias


def _w4a16_args(m, n, k, r, dtype, has_bias, seed=0, transposed=False):
    """``linear_w4a16``'s arguments: random unsigned codes, scales and minima like a W4A16 layer's."""
    x, q_w, s_w, smooth, lora_down, lora_up, bias = _linear_args(m, n, k, r, dtype, has_bias, seed, transposed)
    mins = (-8 * s_w.float()).to(dtype)  # q·s + m centred on 0, as a weight's groups are
    return x, q_w, s_w, mins, smooth, lora_down, lora_up, bias


# ------------------------------------------------------------------------------------------ opcheck

# Every op in the ``svdquant`` namespace must have cases here (test_every_op_is_opchecked).
OPCHECK_CASES = {
    "quantize_act": {
        "M0-fp32": lambda: _act_args(0, 64, 4, torch.float32),
        "M1-bf16-r0": lambda: _act_args(1, 64, 0, torch.bfloat16),
        "M1-fp16": lambda: _act_args(1, 128, 4, torch.float16),
        "M7-fp32-transposed": lambda: _act_args(7, 192, 3, torch.float32, transposed=True),
        "M16-bf16-r32": lambda: _act_args(16, 128, 32, torch.bfloat16),
    },
    "gemm_w4a4": {
        "M0-fp32-bias": lambda: _gemm_args(0, 64, 64, 4, torch.float32, True),
        "M1-bf16": lambda: _gemm_args(1, 33, 128, 4, torch.bfloat16, False),
        "M1-fp16-bias-r0": lambda: _gemm_args(1, 64, 64, 0, torch.float16, True),
        "M7-fp32": lambda: _gemm_args(7, 200, 192, 3, torch.float32, False),
        "M16-bf16-bias": lambda: _gemm_args(16, 64, 128, 32, torch.bfloat16, True),
        "M7-fp16-transposed": lambda: _transposed_views(_gemm_args(7, 40, 128, 4, torch.float16, True)),
    },
    "linear": {
        "M0-fp32-bias": lambda: _linear_args(0, 64, 64, 4, torch.float32, True),
        "M1-bf16": lambda: _linear_args(1, 33, 128, 4, torch.bfloat16, False),
        "M1-fp16-bias-r0": lambda: _linear_args(1, 64, 64, 0, torch.float16, True),
        "M7-fp32-transposed": lambda: _linear_args(7, 200, 192, 3, torch.float32, False, transposed=True),
        "M70-bf16-bias": lambda: _linear_args(70, 64, 3072, 32, torch.bfloat16, True),
    },
    "linear_w4a16": {
        "M0-fp32-bias": lambda: _w4a16_args(0, 64, 64, 4, torch.float32, True),
        "M1-bf16": lambda: _w4a16_args(1, 33, 128, 4, torch.bfloat16, False),
        "M1-fp16-bias-r0": lambda: _w4a16_args(1, 64, 64, 0, torch.float16, True),
        "M7-fp32-transposed": lambda: _w4a16_args(7, 200, 192, 3, torch.float32, False, transposed=True),
        "M70-bf16-bias": lambda: _w4a16_args(70, 64, 3072, 32, torch.bfloat16, True),
    },
    # The CUDA GEMM's layout; off CUDA the op unpacks and runs the reference (test_cuda.py opchecks it on a GPU).
    "gemm_w4a4_mma": {
        "M0-fp32-bias": lambda: _mma_args(0, 64, 64, 4, torch.float32, True),
        "M1-bf16": lambda: _mma_args(1, 33, 128, 4, torch.bfloat16, False),
        "M7-fp16-bias-r0": lambda: _mma_args(7, 200, 192, 0, torch.float16, True),
    },
}


def _mma_args(m, n, k, r, dtype, has_bias, seed=0):
    q_x, s_x, q_w, s_w, lora_act, lora_up, bias, dtype = _gemm_args(m, n, k, r, dtype, has_bias, seed)
    return (q_x, s_x, lora_act, *ops.pack_mma_weights(q_w, s_w, lora_up, bias), dtype)


def _transposed_views(args):
    """The same values, every 2-D tensor argument as a non-contiguous (transposed-storage) view."""
    return tuple(a.t().contiguous().t() if isinstance(a, torch.Tensor) and a.dim() == 2 else a for a in args)


def _svdquant_op_names() -> set[str]:
    names = set()
    for qualname in torch._C._dispatch_get_all_op_names():
        ns, _, rest = qualname.partition("::")
        if ns == "svdquant":
            names.add(rest.split(".")[0])
    return names


@pytest.mark.parametrize(("op_name", "case"), [(op, case) for op, cases in OPCHECK_CASES.items() for case in cases])
def test_opcheck(native, op_name, case):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) passes, with
    the native kernel and with the reference fallback."""
    args = OPCHECK_CASES[op_name][case]()
    torch.library.opcheck(getattr(torch.ops.svdquant, op_name), args)


def test_every_op_is_opchecked():
    """Every op registered in the ``svdquant`` namespace has opcheck cases, including M = 0 and
    M = 1, so a new op cannot skip opcheck."""
    names = _svdquant_op_names()
    assert {"quantize_act", "gemm_w4a4"} <= names
    missing = names - set(OPCHECK_CASES)
    assert not missing, f"ops without opcheck cases in OPCHECK_CASES: {sorted(missing)}"
    for op, cases in OPCHECK_CASES.items():
        assert any(c.startswith("M0-") for c in cases) and any(c.startswith("M1-") for c in cases), op


# ----------------------------------------------------------------------------- ops versus reference


def _assert_lora_act_close(got, x, smooth, lora_down):
    xh = x.double() / smooth.double()
    want = xh @ lora_down.double()
    mag = xh.abs() @ lora_down.double().abs()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert bool(((got.double() - want).abs() <= 1e-5 * mag + 1e-30).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize(("m", "k", "r"), [(0, 64, 3), (1, 64, 0), (5, 128, 3), (33, 192, 32)])
def test_quantize_act_matches_reference(native, m, k, r, dtype, transposed):
    """The op's q_x and s_x equal reference.quantize_act exactly, lora_act within summation-order
    tolerance, for contiguous input and for a transposed (non-contiguous) view."""
    x, smooth, lora_down = _act_args(m, k, r, dtype, seed=m + k + r, transposed=transposed)
    assert x.is_contiguous() == (not transposed or m <= 1)
    q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
    rq, rs, _ = reference.quantize_act(x.contiguous(), smooth, lora_down)
    assert q_x.dtype == torch.uint8 and q_x.shape == (m, k // 2)
    assert s_x.dtype == torch.float32 and s_x.shape == (m, k // 64)
    assert torch.equal(q_x, rq)
    assert torch.equal(s_x, rs)
    _assert_lora_act_close(lora_act, x, smooth, lora_down)


def test_quantize_act_outputs_contiguous(native):
    """The op's outputs are contiguous, as its fake impl (x.new_empty) declares, also for a
    transposed x: torch.compile plans with the fake strides."""
    x, smooth, lora_down = _act_args(7, 192, 3, torch.float32, transposed=True)
    for t in torch.ops.svdquant.quantize_act(x, smooth, lora_down):
        assert t.is_contiguous(), t.stride()


def test_quantize_act_noncontiguous_smooth_and_lora_down(native):
    """Strided smooth and a transposed lora_down give the same result as contiguous copies."""
    g = _gen(3)
    x = torch.randn(9, 128, generator=g)
    smooth = (torch.rand(256, generator=g) + 0.5)[::2]
    lora_down = torch.randn(8, 128, generator=g).t()
    assert not smooth.is_contiguous() and not lora_down.is_contiguous()
    got = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
    want = reference.quantize_act(x, smooth.contiguous(), lora_down.contiguous())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _assert_lora_act_close(got[2], x, smooth, lora_down)


def test_quantize_act_special_values(native):
    """All-zero groups give scale 0 and code 0 (no NaN); exact halfway ties round to even."""
    x = torch.zeros(3, 128)
    x[1, 64:] = torch.tensor([7.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -3.5] * 8)
    smooth = torch.ones(128)
    q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, smooth, torch.zeros(128, 2))
    assert s_x.tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    codes = reference.unpack_int4(q_x)
    assert (codes[0] == 0).all() and (codes[2] == 0).all() and (codes[1, :64] == 0).all()
    assert codes[1, 64:72].tolist() == [7, 0, 2, 2, -2, 0, 4, -4]
    assert torch.isfinite(lora_act).all()


def test_quantize_act_mixed_dtypes_match_reference(native):
    """smooth / lora_down in float32 with bfloat16 x: reference.quantize_act documents them as "any
    float dtype" and uses them in float32; the op must give the reference's codes."""
    g = _gen(4)
    x = torch.randn(8, 128, generator=g).to(torch.bfloat16)
    smooth = torch.rand(128, generator=g) + 0.5  # float32, not representable in bf16
    lora_down = torch.randn(128, 4, generator=g)
    got = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
    want = reference.quantize_act(x, smooth, lora_down)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _assert_lora_act_close(got[2], x, smooth, lora_down)


def test_native_kernel_is_used(monkeypatch):
    """With ``_C`` built, the CPU op calls ``_C.quantize_act`` (it does not silently fall back)."""
    if not ops.native_available():
        pytest.skip("diffusers_svdquant._C not built")
    calls = []
    real = ops.native._C

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def quantize_act(self, *args, **kwargs):
            calls.append(1)
            return real.quantize_act(*args, **kwargs)

    monkeypatch.setattr(ops.native, "_C", Spy())
    x, smooth, lora_down = _act_args(3, 128, 5, torch.float32)
    got = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
    assert calls == [1]
    assert torch.equal(got[0], reference.quantize_act(x, smooth, lora_down)[0])


def test_fallback_without_native_runs_reference_and_warns_once(monkeypatch):
    """Without ``_C`` every CPU op still runs (``reference.py``, bit for bit) and says so once per op
    (RuntimeWarning), not per call."""
    monkeypatch.setattr(ops.native, "_C", None)
    monkeypatch.setattr(ops.native, "_warned", set())
    x, smooth, lora_down = _act_args(3, 128, 4, torch.bfloat16)
    q = algorithm.svdquant_weight(torch.randn(40, 128, generator=_gen(5)), 4, dtype=torch.bfloat16)
    bias = torch.randn(40, generator=_gen(6)).to(torch.bfloat16)
    q_x, s_x, lora_act = reference.quantize_act(x, smooth, lora_down)
    calls = {
        "quantize_act": (
            lambda: torch.ops.svdquant.quantize_act(x, smooth, lora_down),
            (q_x, s_x, lora_act),
        ),
        "gemm_w4a4": (
            lambda: torch.ops.svdquant.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, x.dtype),
            reference.gemm_w4a4(q_x, s_x, q.qweight, q.wscales, lora_act, q.lora_up, bias, x.dtype),
        ),
        "linear": (
            lambda: torch.ops.svdquant.linear(x, q.qweight, q.wscales, smooth, lora_down, q.lora_up, bias),
            reference.svdquant_linear(x, q.qweight, q.wscales, smooth, lora_down, q.lora_up, bias),
        ),
    }
    for name, (call, want) in calls.items():
        with pytest.warns(RuntimeWarning, match=f"{name}: diffusers_svdquant._C unavailable"):
            got = call()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = call()
        for g, a, w in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, again, want)), strict=True):
            assert torch.equal(g, w) and torch.equal(a, w), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize(("m", "n", "k", "r"), [(0, 64, 64, 3), (1, 1, 64, 0), (7, 200, 192, 3), (64, 64, 128, 32)])
def test_gemm_matches_reference(native, m, n, k, r, has_bias, dtype):
    """The gemm op equals reference.gemm_w4a4 within the module tolerance, in the requested dtype."""
    args = _gemm_args(m, n, k, r, dtype, has_bias, seed=m + n + k + r)
    y = torch.ops.svdquant.gemm_w4a4(*args)
    want = reference.gemm_w4a4(*args)
    assert y.dtype == dtype and y.shape == (m, n)
    q_x, s_x, q_w, s_w, lora_act, lora_up, bias, _ = args
    mag = (reference.dequantize_groups(reference.unpack_int4(q_x), s_x).double().abs()
           @ reference.dequantize_groups(reference.unpack_int4(q_w), s_w).double().abs().t()
           + lora_act.double().abs() @ lora_up.double().abs().t())  # fmt: skip
    if bias is not None:
        mag = mag + bias.double().abs()
    rel, tiny = OUT_ROUNDOFF[dtype]
    tol = 1e-5 * mag + rel * want.double().abs() + tiny + 1e-30
    if bf16_branch(ops.cpu_isa(), m, r, dtype):  # the branch from bf16-rounded lora_act (docs/design.md §1)
        tol = tol + branch_bound(want.float(), lora_act, lora_up).double()
    assert bool(((y.double() - want.double()).abs() <= tol).all())


def test_gemm_noncontiguous_inputs(native):
    """Transposed / strided views of every gemm input give the same result as contiguous copies."""
    q_x, s_x, q_w, s_w, lora_act, lora_up, bias, dt = _gemm_args(6, 40, 128, 4, torch.float32, True, seed=9)
    views = (q_x.t().contiguous().t(), s_x.t().contiguous().t(), q_w.t().contiguous().t(),
             s_w.t().contiguous().t(), lora_act.t().contiguous().t(), lora_up.t().contiguous().t(),
             torch.stack([bias, bias], 1)[:, 0])  # fmt: skip
    assert not any(v.is_contiguous() for v in views)
    y = torch.ops.svdquant.gemm_w4a4(*views, dt)
    want = reference.gemm_w4a4(q_x, s_x, q_w, s_w, lora_act, lora_up, bias, dt)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_svdquant_linear_op_path_matches_reference(native):
    """ops.svdquant_linear (quantize_act op then gemm op) equals reference.svdquant_linear."""
    w = torch.randn(96, 192, generator=_gen(11)) * 0.05
    q = algorithm.quantize_weight(w, 8, dtype=torch.bfloat16)
    x = torch.randn(10, 192, generator=_gen(12)).to(torch.bfloat16)
    bias = torch.randn(96, generator=_gen(13)).to(torch.bfloat16)
    y = ops.svdquant_linear(x, *q[:5], bias)
    want = reference.svdquant_linear(x, *q[:5], bias)
    assert y.dtype == torch.bfloat16
    if bf16_branch(ops.cpu_isa(), 10, 8, torch.bfloat16):  # docs/design.md §1: the branch from bf16 operands
        f = [t.float() for t in (x, q.smooth, q.lora_down, q.lora_up, q.wscales, bias)]
        x_hat = f[0] / f[1]
        ref = reference.svdquant_linear(f[0], q.qweight, f[4], f[1], f[2], f[3], f[5])
        assert within(y, ref, branch_bound(ref, x_hat @ f[2], f[3], x_hat, f[2]))
    else:
        torch.testing.assert_close(y, want, rtol=2.0**-7, atol=1e-5)


# -------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("x_shape", "smooth_shape", "down_shape", "x_dtype", "pattern"),
    [
        ((128,), (128,), (128, 2), torch.float32, r"x must be 2-D.*\(128,\)"),
        ((2, 3, 128), (128,), (128, 2), torch.float32, r"x must be 2-D.*\(2, 3, 128\)"),
        ((4, 100), (100,), (100, 2), torch.float32, r"K=100"),
        ((4, 128), (64,), (128, 2), torch.float32, r"smooth has shape \(64,\), expected \[128\]"),
        ((4, 128), (1, 128), (128, 2), torch.float32, r"smooth has shape \(1, 128\)"),
        ((4, 128), (128,), (64, 2), torch.float32, r"lora_down has shape \(64, 2\), expected \[128, r\]"),
        ((4, 128), (128,), (128,), torch.float32, r"lora_down has shape \(128,\)"),
        ((4, 128), (128,), (128, 2), torch.int32, r"x has dtype torch.int32"),
        ((4, 128), (128,), (128, 2), torch.float64, r"x has dtype torch.float64"),
    ],
)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_quantize_act_bad_input(x_shape, smooth_shape, down_shape, x_dtype, pattern, device):
    """Bad quantize_act input → ValueError naming the argument and its shape/dtype, on the CPU
    kernel and on the fake (meta) path torch.compile traces."""
    x = torch.ones(x_shape, dtype=x_dtype, device=device)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.svdquant.quantize_act(
            x, torch.ones(smooth_shape, device=device), torch.zeros(down_shape, device=device)
        )


def _good_gemm(m=4, n=8, k=128, r=3):
    return {
        "q_x": torch.zeros(m, k // 2, dtype=torch.uint8),
        "s_x": torch.ones(m, k // 64),
        "q_w": torch.zeros(n, k // 2, dtype=torch.uint8),
        "s_w": torch.ones(n, k // 64),
        "lora_act": torch.zeros(m, r),
        "lora_up": torch.zeros(n, r),
        "bias": torch.zeros(n),
    }


@pytest.mark.parametrize(
    ("name", "bad", "pattern"),
    [
        ("s_x", torch.ones(4, 3), r"s_x has shape \(4, 3\), expected \[4, 2\]"),
        ("s_x", torch.ones(5, 2), r"s_x has shape \(5, 2\)"),
        ("q_w", torch.zeros(8, 32, dtype=torch.uint8), r"q_w has shape \(8, 32\), expected \[8, 64\]"),
        ("s_w", torch.ones(8, 1), r"s_w has shape \(8, 1\), expected \[8, 2\]"),
        ("lora_act", torch.zeros(5, 3), r"lora_act has shape \(5, 3\)"),
        ("lora_act", torch.zeros(4, 2), r"(lora_act|lora_up) has shape"),
        ("lora_up", torch.zeros(9, 3), r"lora_up has shape \(9, 3\), expected \[8, 3\]"),
        ("bias", torch.zeros(9), r"bias has shape \(9,\), expected \[8\]"),
        ("q_x", torch.zeros(4, 64, dtype=torch.int8), r"uint8.*torch.int8"),
        ("q_w", torch.zeros(8, 64, dtype=torch.int32), r"uint8.*torch.int32"),
    ],
)
def test_gemm_bad_input(name, bad, pattern):
    """Inconsistent gemm shapes or non-uint8 codes → ValueError naming the argument and shapes."""
    args = _good_gemm()
    torch.ops.svdquant.gemm_w4a4(*args.values(), torch.float32)  # the baseline is valid
    args[name] = bad
    with pytest.raises(ValueError, match=pattern):
        torch.ops.svdquant.gemm_w4a4(*args.values(), torch.float32)


def test_gemm_k_not_multiple_of_64():
    """q_x / q_w with K = 96 (not a multiple of 64) → ValueError naming K."""
    m, n = 3, 5
    args = (torch.zeros(m, 48, dtype=torch.uint8), torch.ones(m, 1), torch.zeros(n, 48, dtype=torch.uint8),
            torch.ones(n, 1), torch.zeros(m, 0), torch.zeros(n, 0), None, torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="96"):
        torch.ops.svdquant.gemm_w4a4(*args)


def test_gemm_q_x_not_2d():
    """A 3-D q_x → ValueError naming q_x and its shape."""
    args = _good_gemm()
    args["q_x"] = args["q_x"][None]
    with pytest.raises(ValueError, match=r"q_x.*\(1, 4, 64\)"):
        torch.ops.svdquant.gemm_w4a4(*args.values(), torch.float32)


# ---------------------------------------------------------------------------------- torch.compile


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = SVDQuantLinear.from_linear(nn.Linear(128, 192), 8)
        self.fc2 = SVDQuantLinear.from_linear(nn.Linear(192, 64, bias=False), 4)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) + x[..., :64]


def _compile_matches_eager(compile_backend: str) -> None:
    torch._dynamo.reset()
    model = _Block().eval()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    for shape in ((2, 5, 128), (3, 128)):
        x = torch.randn(shape, generator=_gen(sum(shape)))
        with torch.no_grad():
            want = model(x)
            got = compiled(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_aot_eager():
    """torch.compile(fullgraph=True) (aot_eager: Dynamo + AOTAutograd through the fake impls) of a
    module with SVDQuantLinear runs without graph breaks and matches eager."""
    _compile_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    """The same with Inductor (about 25 s on two cores, hence ``slow``)."""
    t = time.time()
    _compile_matches_eager("inductor")
    assert time.time() - t < 300


# ----------------------------------------------------------------------------------- CPU ISA control


def test_isa_controls_without_native(monkeypatch):
    """Without ``_C``: no ISAs, cpu_isa() is None, set_cpu_isa raises RuntimeError."""
    monkeypatch.setattr(ops.native, "_C", None)
    assert ops.supported_cpu_isas() == []
    assert ops.cpu_isa() is None
    with pytest.raises(RuntimeError, match="not available"):
        ops.set_cpu_isa("generic")


@pytest.mark.skipif(not ops.native_available(), reason="diffusers_svdquant._C not built")
def test_isa_controls_native():
    """supported_cpu_isas lists "generic" first and includes cpu_isa(); every supported path can
    be selected and gives bit-identical q_x / s_x; an unknown path → ValueError naming it."""
    isas = ops.supported_cpu_isas()
    original = ops.cpu_isa()
    assert isas and isas[0] == "generic"
    assert original in isas
    assert len(set(isas)) == len(isas)
    x, smooth, lora_down = _act_args(37, 192, 5, torch.bfloat16, seed=21)
    rq, rs, _ = reference.quantize_act(x, smooth, lora_down)
    try:
        for isa in isas:
            ops.set_cpu_isa(isa)
            assert ops.cpu_isa() == isa
            q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, smooth, lora_down)
            assert torch.equal(q_x, rq), isa
            assert torch.equal(s_x, rs), isa
            _assert_lora_act_close(lora_act, x, smooth, lora_down)
        with pytest.raises(ValueError, match=re.escape("no-such-isa")):
            ops.set_cpu_isa("no-such-isa")
        assert ops.cpu_isa() == isas[-1]  # a failed selection changes nothing
    finally:
        ops.set_cpu_isa(original)
    assert ops.cpu_isa() == original


# ----------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_reaches_the_input_through_the_dequantized_weight(dtype):
    """svdquant::linear's backward (QLoRA): dx = dy @ ((deq(q_w, s_w) + lora_up lora_downᵀ) / λ), in x's dtype;
    the 4-bit tensors and the branch stay frozen (no gradient)."""
    torch.manual_seed(0)
    layer = SVDQuantLinear.from_linear(nn.Linear(128, 64), 8, act_absmax=torch.rand(128) + 0.5, dtype=dtype)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 5, 64, dtype=dtype)
    layer(x).backward(dy)
    want = (dy.float().reshape(-1, 64) @ layer.dequantized_weight()).reshape(3, 5, 128)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in layer.parameters())


def test_cuda_path_backward_matches_the_canonical_op():
    """svdquant_linear_mma (the CUDA fast path, here on its CPU reference) takes the same input gradient."""
    torch.manual_seed(1)
    layer = SVDQuantLinear.from_linear(nn.Linear(128, 192), 16, act_absmax=torch.rand(128) + 0.5)
    x = torch.randn(7, 128, requires_grad=True)
    ops.svdquant_linear_mma(x, layer.smooth, layer.lora_down, layer.mma_weights()).square().sum().backward()
    got, x.grad = x.grad, None
    layer(x).square().sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-4)


def test_backward_through_the_code_ops_says_where_gradients_flow():
    """quantize_act / gemm_w4a4 output codes: a graph that needs their gradient gets one clear line."""
    layer = SVDQuantLinear.from_linear(nn.Linear(128, 64), 8)
    x = torch.randn(3, 128, requires_grad=True)
    q_x, s_x, lora_act = torch.ops.svdquant.quantize_act(x, layer.smooth, layer.lora_down)
    with pytest.raises(RuntimeError, match=r"svdquant::quantize_act has no backward.*svdquant::linear"):
        lora_act.sum().backward()
    with torch.no_grad():
        assert layer(x).shape == (3, 64)
