"""The weight-only (W4A16) op on CPU, every instruction path, against an independent float64 computation.

``ops.linear_w4a16`` has three CPU regimes (ops/weight_only.py, ``weight_only.cpu_regime``): few rows the
native float32 kernel (``_C.linear_w4a16``), or for bfloat16 on the avx512vnni, avx512bf16 and amx paths its
bfloat16 GEMV (``bf16=True``, tests/test_w4a16_gemv_bf16.py); more rows of bfloat16 on the avx512bf16 and amx paths
a tile kernel (``tiles=True``, tests/test_w4a16_tiles.py);
more rows elsewhere natively dequantized panels through ``torch.mm``.

Tolerances, per element, against the exact result computed in float64 from the same x̂, W, lora and bias
(``bound`` is Σ|x̂·W| + Σ|lora_act·lora_up| + |bias|, the scale of the rounding errors of a dot product):

* float32 arithmetic (the native kernel; float32 panels): ``1e-5 · bound``. Only the order of the float32
  sums differs from the reference (lanes, chains, a tree): the error of each order is far below
  K · 2⁻²⁴ · bound, measured < 1e-6 · bound at K = 12288.
* bfloat16 panels or tiles (bfloat16 x beyond the float32 kernel's rows): ``2⁻⁵ · spread`` with ``spread`` =
  sqrt(Σ(x̂·W)² + Σ(lora_act·lora_up)²). x̂, W, lora_act and lora_up are rounded to bfloat16 (relative
  error up to 2⁻⁸ each, bfloat16's unit roundoff, independent per term) before torch's float32-accumulating
  matmul, as a bfloat16 ``nn.Linear`` rounds its operands: an error of standard deviation about 0.8 · 2⁻⁸ ·
  spread, so the bound is some 10 standard deviations (a worst case, 2⁻⁷ · bound, would hide single wrong terms).
* the bfloat16 GEMV (bfloat16 x, few rows, avx512vnni, avx512bf16 and amx paths): ``2⁻⁵ · spread + 1e-5 · bound``, the
  tolerance of rounding x̂ alone to bfloat16: the error Σ δ_k·x̂_k·W_k with independent |δ_k| ≤ u = 2⁻⁸
  (bfloat16's unit roundoff, eps / 2) exceeds 8u · sqrt(Σ(x̂·W)²) with probability below 2·e⁻³² (Hoeffding), and
  2⁻⁵ · spread ≥ that; the float32 part is the float32 kernel's. The kernel's x̂ in 16-bit fixed point errs
  less (at most half a step, about amax · 2⁻¹⁶, per element); tests/test_w4a16_gemv_bf16.py holds it to that bound.
* Plus one rounding to the output dtype: ``eps(dtype) · |exact|`` (and its smallest subnormal).

Each check can fail: a wrong nibble, group, scale, minimum, row or column moves an element by about
|x̂|·|W| of one or more terms, far above these bounds at the sizes tested; the norm check beside it catches
systematic errors the element bound lets through: the error's norm within 1e-5 of ‖exact‖ in float32, and within
2⁻⁶ of ‖spread‖ where operands are rounded to bfloat16 (their error scales with the spread, not with a result
that may cancel).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_svdquant import ops, reference
from diffusers_svdquant.ops import native, weight_only

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="diffusers_svdquant._C not built")
_C = native._C
ISAS = ops.supported_cpu_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
G = reference.GROUP_SIZE
F32_TOL = 1e-5
BF16_PANEL_TOL = 2.0**-5
BF16_GEMV_TOL = 2.0**-5
BF16_NORM_TOL = 2.0**-6  # of ‖spread‖: the bfloat16 paths' error norm (measured up to 2⁻⁷·⁵ of it)
NORM_CHECK_MIN_ELEMENTS = 16


@contextlib.contextmanager
def on_isa(name: str):
    """Selects one CPU path and restores the previous one afterwards."""
    before = ops.cpu_isa()
    ops.set_cpu_isa(name)
    try:
        yield name
    finally:
        ops.set_cpu_isa(before)


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    with on_isa(request.param) as name:
        yield name


def make_case(m, n, k, r, dtype, has_bias=True, seed=0):
    """Tensors of a W4A16 layer and an input: W with a constant group (scale 0) and a wide group, x with
    outliers, smooth in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if k >= G:
        w[0, :G] = 0.375  # an all-constant group: scale 0, codes 0, W = m exactly
        if n > 1:
            w[n - 1, k - G :] *= 40.0
    codes, wscales, wmins = reference.quantize_groups_affine(w, param_dtype=dtype)
    qweight = reference.pack_int4(codes)  # packs the low 4 bits: unsigned codes keep their value
    x = torch.randn(m, k, generator=g)
    if m * k:
        x.view(-1)[torch.randint(0, m * k, (max(1, m * k // 100),), generator=g)] *= 30.0
    smooth = torch.empty(k).uniform_(0.5, 2.0, generator=g)
    lora_down = torch.randn(k, r, generator=g) / max(k, 1) ** 0.5
    lora_up = torch.randn(n, r, generator=g)
    bias = torch.randn(n, generator=g) if has_bias else None
    cast = [t if t is None else t.to(dtype) for t in (x, smooth, lora_down, lora_up, bias)]
    return cast[0], qweight, wscales, wmins, cast[1], cast[2], cast[3], cast[4]


def exact(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias):
    """The float64 result and its error scales ``bound`` and ``spread`` (module docstring)."""
    xh = x.double() / smooth.double()
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qweight), wscales, wmins).double()
    la = xh @ lora_down.double()
    lu = lora_up.double()
    b = torch.zeros(qweight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    y = xh @ w.t() + la @ lu.t() + b
    bound = xh.abs() @ w.abs().t() + la.abs() @ lu.abs().t() + b.abs()
    spread = ((xh * xh) @ (w * w).t() + (la * la) @ (lu * lu).t()).sqrt()
    return y, bound, spread


@functools.lru_cache(maxsize=4)
def cached_case(m, n, k, r, dtype, has_bias, seed):
    case = make_case(m, n, k, r, dtype, has_bias, seed)
    return case, exact(*case)


def rounds_to_bf16(x: torch.Tensor) -> bool:
    """Whether the op's regime for ``x`` on the selected CPU path rounds its operands to bfloat16."""
    if x.dtype != torch.bfloat16:
        return False
    regime = weight_only.cpu_regime(x.shape[0], x.dtype)
    fixed_or_tiles = ("tiles", "gemv_bf16", "gemm_bf16")
    return regime in fixed_or_tiles or (regime == "panels" and weight_only.panel_dtype(x.dtype) == x.dtype)


def scaled_tolerance(x: torch.Tensor, bound: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """The summation-and-operand part of the allowed error of ``ops.linear_w4a16(x, ...)`` (module docstring)."""
    if rounds_to_bf16(x):
        if weight_only.cpu_regime(x.shape[0], x.dtype) in ("gemv_bf16", "gemm_bf16"):  # the fixed point
            return BF16_GEMV_TOL * spread + F32_TOL * bound
        return BF16_PANEL_TOL * spread
    return F32_TOL * bound


def assert_close(y, truth, scaled_tol, dtype, norm_tol=1e-5, norm_ref=None):
    """Each element of ``y`` within ``scaled_tol`` (plus one rounding to ``dtype``) of ``truth``, and the error's
    norm within ``norm_tol`` of ``norm_ref``'s (default ``truth``; the bfloat16 checks pass ``spread``)."""
    assert y.dtype == dtype and y.shape == truth.shape
    if not y.numel():
        return
    fi = torch.finfo(dtype)
    allowed = scaled_tol + fi.eps * truth.abs() + fi.smallest_normal * fi.eps
    err = (y.double() - truth).abs()
    bad = err > allowed
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {y.numel()} elements off, e.g. {i}: {y[tuple(i)].item()} vs {truth[tuple(i)].item()}"
            f" (error {err[tuple(i)].item():.3g}, allowed {allowed[tuple(i)].item():.3g})"
        )
    # The norm check catches errors each element's bound lets through but that add up (a bias). Over a handful of
    # elements it only measures how much one output happened to cancel (hypothesis found m = n = 1 sums whose
    # bfloat16 rounding passed the element bound and failed this one): there the element bound is the test.
    # Rounded operands err in proportion to the spread, not to the result: measured against ‖truth‖, one column
    # that cancels (a planted x40 group: truth 15.8, spread 294) failed a kernel within its element bound.
    if y.numel() >= NORM_CHECK_MIN_ELEMENTS:
        ref = truth.norm() if norm_ref is None else norm_ref.norm()
        assert (y.double() - truth).norm() <= norm_tol * ref + fi.eps * truth.norm() + 1e-30


def check(case, expected=None):
    truth, bound, spread = expected or exact(*case)
    y = ops.linear_w4a16(*case)
    x = case[0]
    if rounds_to_bf16(x):
        assert_close(y, truth, scaled_tolerance(x, bound, spread), x.dtype, BF16_NORM_TOL, norm_ref=spread)
    else:
        assert_close(y, truth, scaled_tolerance(x, bound, spread), x.dtype)
    return y


# The CPU path varies fastest, so consecutive tests share a cached case. Rows: none, the few-rows kernel
# (1, 2, 4 in its register blocks), the bfloat16 switch to panels (5), odd counts past one register block
# (7, 17, 33) and panels of many rows; columns: 1, 7, 33 and 200 (tails of the 16-column panels and of the
# 240-column torch panels); K from one group to 3072.
def test_bf16_norm_check_catches_a_bias_the_element_bound_lets_through():
    # A systematic error of 2⁻⁵·⁵ of the spread on every element passes the element bound (2⁻⁵ · spread) and
    # must fail the norm check (2⁻⁶ of ‖spread‖); plain bfloat16 rounding of the exact result must pass both.
    truth, _, spread = exact(*make_case(4, 40, 576, 8, torch.bfloat16, seed=7))
    assert_close(truth.bfloat16(), truth, BF16_PANEL_TOL * spread, torch.bfloat16, BF16_NORM_TOL, norm_ref=spread)
    biased = (truth + 2.0**-5.5 * spread).bfloat16()
    with pytest.raises(AssertionError):
        assert_close(biased, truth, BF16_PANEL_TOL * spread, torch.bfloat16, BF16_NORM_TOL, norm_ref=spread)


@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [0, 32])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (7, 128), (200, 192), (33, 3072)])
@pytest.mark.parametrize("m", [0, 1, 2, 4, 5, 7, 16, 17, 33, 260])
def test_matches_exact(isa_name, m, n, k, r, dtype):
    case, expected = cached_case(m, n, k, r, dtype, (m + n + r) % 2 == 1, m * 7 + n + k)
    with on_isa(isa_name):
        y = check(case, expected)
    ref = reference.linear_w4a16(*case)  # the spec itself meets the same bound (a check of the check)
    assert_close(ref, expected[0], F32_TOL * expected[1], dtype)
    assert y.shape == ref.shape and y.dtype == ref.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 24])
def test_wide_k(isa, m, dtype):
    # FLUX's MLP down projection (K = 12288): several K blocks of the few-rows kernel per column.
    check(make_case(m, 24, 12288, 32, dtype, seed=m))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("m", "r"), [(1, 40), (2, 7), (3, 64)])
def test_wide_k_rank_tails(isa, threads, m, r):
    # The few-rows kernel computes lora_act itself, each thread over its share of K's groups (4 vectors of R at
    # a time, a scalar tail), and prefetches across K blocks and panels: K = 12288, N with a panel tail.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(make_case(m, 37, 12288, r, torch.float32, seed=m + r))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_thread_counts(isa, threads, m):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(make_case(m, 70, 256, 8, torch.bfloat16, seed=threads))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_native_thread_counts(isa, threads):
    # More threads than panels or cores: the same result, and it does not fail.
    case = make_case(3, 40, 128, 4, torch.float32, seed=5)
    y = torch.empty(3, 40)
    call_native(case, y, threads=threads)
    truth, bound, _ = exact(*case)
    assert_close(y, truth, F32_TOL * bound, torch.float32)


@pytest.mark.parametrize("m", [2, 30])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "strided_rows"])
def test_non_contiguous_x(isa, m, layout):
    x, *rest = make_case(m, 33, 256, 16, torch.bfloat16, seed=2)
    if layout == "transposed":
        xv = x.t().contiguous().t()
    elif layout == "sliced":
        xv = torch.cat([x, torch.zeros(m, 64, dtype=x.dtype)], dim=1)[:, :256]
    else:
        xv = torch.stack([x, torch.zeros_like(x)], dim=1).reshape(2 * m, 256)[::2]
    assert not xv.is_contiguous() and torch.equal(xv, x)
    assert torch.equal(ops.linear_w4a16(xv, *rest), check((x, *rest)))


@pytest.mark.parametrize("m", [1, 20])
def test_constant_groups(isa, m):
    # Every group constant: scales 0, codes 0, W = m; then y is x̂ · m summed, with no NaN from 0 scales.
    n, k = 9, 192
    w = torch.arange(n * k // G, dtype=torch.float32).repeat_interleave(G).reshape(n, k) / 8 - 1
    codes, wscales, wmins = reference.quantize_groups_affine(w, param_dtype=torch.float32)
    assert not wscales.any() and not codes.any() and torch.equal(wmins.repeat_interleave(G, 1), w)
    x = torch.randn(m, k)
    args = (x, reference.pack_int4(codes), wscales, wmins, torch.ones(k), torch.zeros(k, 0), torch.zeros(n, 0), None)
    truth, bound, _ = exact(*args)
    assert_close(ops.linear_w4a16(*args), truth, F32_TOL * bound, torch.float32)


@pytest.mark.parametrize("m", [2, 40])
def test_mixed_dtypes(isa, m):
    # Float32 parameters under a bfloat16 x (and the reverse) compute in float32: the float32 tolerance holds (at
    # 2 rows on the GEMV paths too, whose bfloat16 GEMV takes only all-bfloat16 tensors). The tiles and panels of
    # 40 bfloat16 rows round x̂ and W to bfloat16 whatever the parameters' dtype: their tolerance.
    x, qw, ws, wm, sm, ld, lu, b = make_case(m, 20, 128, 8, torch.float32, seed=9)
    for args in ((x.bfloat16(), qw, ws, wm, sm, ld, lu, b), (x, qw, ws.bfloat16(), wm.bfloat16(), sm, ld, lu, b)):
        if weight_only.cpu_regime(m, args[0].dtype) in ("tiles", "panels"):
            check(args)
        else:
            truth, bound, _ = exact(*args)
            assert_close(ops.linear_w4a16(*args), truth, F32_TOL * bound, args[0].dtype)


@pytest.mark.parametrize("isa_name", [i for i in ISAS if i not in weight_only.TILES_AFTER_ROWS])
def test_bf16_panels_are_float32_without_bf16_hardware(monkeypatch, isa_name):
    # Without bfloat16 dot products torch's bfloat16 GEMM is emulated (10-100x slower than its float32 one): a
    # bfloat16 x gets float32 panels and x̂, so the float32 tolerance holds, which bfloat16 panels fail.
    case = make_case(40, 33, 256, 8, torch.bfloat16, seed=5)
    truth, bound, _ = exact(*case)
    with on_isa(isa_name):
        monkeypatch.setattr(weight_only, "_bf16_in_hardware", False)
        assert weight_only.panel_dtype(torch.bfloat16) == torch.float32
        assert weight_only.cpu_regime(weight_only.GEMV_MAX_ROWS[torch.float32], torch.bfloat16) != "panels"
        if native._C.w4a16_bf16_gemm_available():  # the fixed-point GEMM takes every row count beyond the GEMV's
            rows = weight_only.GEMM_BF16_AFTER_ROWS
            assert weight_only.cpu_regime(rows, torch.bfloat16) == "gemv_bf16"
            assert weight_only.cpu_regime(rows + 1, torch.bfloat16) == "gemm_bf16"
            assert weight_only.cpu_regime(4096, torch.bfloat16) == "gemm_bf16"
        elif native._C.w4a16_bf16_gemv_available():  # the fixed-point GEMV keeps more rows against float32 panels
            rows = weight_only.GEMV_BF16_EMULATED_MAX_ROWS
            assert weight_only.cpu_regime(rows, torch.bfloat16) == "gemv_bf16"
            assert weight_only.cpu_regime(rows + 1, torch.bfloat16) == "panels"
            assert weight_only.cpu_regime(40, torch.bfloat16) == "panels"
        else:
            assert weight_only.cpu_regime(40, torch.bfloat16) == "panels"
        # The panels themselves (the op's regime where the path has no fixed-point GEMM).
        assert_close(weight_only._linear_w4a16_panels(*case), truth, F32_TOL * bound, torch.bfloat16)
        monkeypatch.setattr(weight_only, "_bf16_in_hardware", True)
        assert weight_only.cpu_regime(40, torch.bfloat16) == "panels"
        with pytest.raises(AssertionError, match="elements off"):
            assert_close(weight_only._linear_w4a16_panels(*case), truth, F32_TOL * bound, torch.bfloat16)


def test_bf16_in_hardware_matches_the_cpu():
    # Against the kernel's own list of CPU flags (Linux, x86-64, a build with the avx512bf16 path).
    if "avx512bf16" not in ops.known_cpu_isas():
        pytest.skip("no avx512bf16 path in this build")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags")
    capped = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    hardware = "avx512_bf16" in flags or "amx_bf16" in flags
    assert weight_only.bf16_in_hardware() == (hardware and capped not in weight_only._ONEDNN_CAPS_WITHOUT_BF16)


@pytest.mark.parametrize(("cap", "native_bf16"), [("AVX2", False), ("avx512_core_vnni", False), ("ALL", True)])
def test_a_onednn_cap_below_bf16_counts_as_emulated(monkeypatch, cap, native_bf16):
    # torch's bfloat16 GEMM is emulated when oneDNN is capped below AVX512_CORE_BF16, whatever the CPU.
    if not weight_only.bf16_in_hardware() and native_bf16:
        pytest.skip("no bfloat16 hardware to count")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(weight_only, "_bf16_in_hardware", None)
    assert weight_only.bf16_in_hardware() == native_bf16


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 24),
    n=st.integers(1, 70),
    groups=st.integers(1, 6),
    r=st.integers(0, 20),
    dtype=st.sampled_from(DTYPES),
    isa_name=st.sampled_from(ISAS),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(m, n, groups, r, dtype, isa_name, has_bias, seed):
    with on_isa(isa_name):
        check(make_case(m, n, groups * G, r, dtype, has_bias, seed))


# --- dequantize_w4a16 ---------------------------------------------------------------------------


def dequantize(qweight, wscales, wmins, smooth, odtype, ldo=None, threads=2):
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    out = torch.zeros(n, ldo or k, dtype=odtype)
    _C.dequantize_w4a16(
        qweight.data_ptr(), wscales.data_ptr(), wmins.data_ptr(), 0 if smooth is None else smooth.data_ptr(),
        out.data_ptr(), n, k, ldo or k, native.DTYPE_CODES[wscales.dtype], native.DTYPE_CODES[odtype], threads,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("odtype", DTYPES, ids=str)
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_dequantize(isa, wdtype, odtype):
    _, qw, ws, wm, sm, *_ = make_case(0, 37, 192, 0, wdtype, seed=4)
    codes = reference.unpack_uint4(qw)
    w = reference.dequantize_groups_affine(codes, ws, wm)
    # The rounding errors of q·s + m scale with its terms, not with the (possibly cancelled) sum.
    terms = reference.dequantize_groups_affine(codes, ws.abs(), wm.abs()).double()
    got = dequantize(qw, ws, wm, None, odtype)
    if wdtype != torch.float32:
        # 16-bit scales: q·s is exact in float32, so q·s + m has one rounding either way: bit for bit.
        assert torch.equal(got, w.to(odtype))
    else:  # a fused multiply-add may round q·s + m once instead of twice: one float32 ulp, then the cast
        assert_close(got, w.double(), 2.0**-23 * terms, odtype)
    with_smooth = dequantize(qw, ws, wm, sm, odtype)
    exact_w = (codes.double() * ws.double().repeat_interleave(G, 1) + wm.double().repeat_interleave(G, 1)) / sm.double()
    # 1 / smooth and the product round once each, q·s + m once or twice.
    assert_close(with_smooth, exact_w, 2.0**-21 * terms / sm.double(), odtype)


def test_dequantize_row_stride(isa):
    _, qw, ws, wm, *_ = make_case(0, 5, 128, 0, torch.bfloat16, seed=1)
    out = dequantize(qw, ws, wm, None, torch.bfloat16, ldo=150)
    assert torch.equal(out[:, :128], dequantize(qw, ws, wm, None, torch.bfloat16))
    assert not out[:, 128:].any()  # nothing written past K in a row


# --- the op's checks and fallback ---------------------------------------------------------------


def test_cpu_kernel_falls_back_to_reference_without_native(monkeypatch):
    case = make_case(3, 10, 128, 4, torch.bfloat16)
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.linear_w4a16(*case)
    assert torch.equal(y, reference.linear_w4a16(*case))
    assert any("linear_w4a16" in str(w.message) and "reference.py" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda a: a.update(x=a["x"][None]), ["x", "2-D"]),
        (lambda a: a.update(x=a["x"].int()), ["x", "dtype"]),
        (lambda a: a.update(x=a["x"][:, :100], smooth=a["smooth"][:100]), ["K=100"]),
        (lambda a: a.update(qweight=a["qweight"][:, :10]), ["qweight", "[N, 64]"]),
        (lambda a: a.update(qweight=a["qweight"].to(torch.int8)), ["qweight", "uint8"]),
        (lambda a: a.update(wscales=a["wscales"][:, :1]), ["wscales", "[6, 2]"]),
        (lambda a: a.update(wmins=a["wmins"][:5]), ["wmins", "[6, 2]"]),
        (lambda a: a.update(smooth=a["smooth"][:64]), ["smooth", "[128]"]),
        (lambda a: a.update(lora_up=a["lora_up"][:, :3]), ["lora_up", "[6, 4]"]),
        (lambda a: a.update(lora_down=a["lora_down"][:64]), ["lora_down", "[128, 4]"]),
        (lambda a: a.update(bias=a["bias"][:5]), ["bias", "[6]"]),
    ],
)
def test_op_rejects_wrong_shapes(change, names):
    x, qw, ws, wm, sm, ld, lu, b = make_case(2, 6, 128, 4, torch.float32)
    args = dict(x=x, qweight=qw, wscales=ws, wmins=wm, smooth=sm, lora_down=ld, lora_up=lu, bias=b)
    change(args)
    with pytest.raises(ValueError) as info:
        ops.linear_w4a16(*args.values())
    for name in names:
        assert name in str(info.value), f"{name!r} not in {info.value}"


# --- the bindings' checks -----------------------------------------------------------------------


def call_native(case, out, threads=2, **over):
    x, qw, ws, wm, sm, ld, lu, b = case
    m, k = x.shape
    args = dict(
        x=x.data_ptr(), smooth=sm.data_ptr(), lora_down=ld.data_ptr(), qweight=qw.data_ptr(),
        wscales=ws.data_ptr(), wmins=wm.data_ptr(), lora_up=lu.data_ptr(), bias=0 if b is None else b.data_ptr(),
        y=out.data_ptr(), M=m, N=qw.shape[0], K=k, R=ld.shape[1], dtype=native.DTYPE_CODES[x.dtype],
        num_threads=threads,
    )  # fmt: skip
    args.update(over)
    _C.linear_w4a16(**args)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"K": 100}, ["K", "100"]),
        ({"K": -64}, ["K", "-64"]),
        ({"M": -1}, ["M", "-1"]),
        ({"N": -3}, ["N", "-3"]),
        ({"R": -2}, ["R", "-2"]),
        ({"dtype": 3}, ["dtype", "3"]),
        ({"num_threads": 0}, ["num_threads", "0"]),
        ({"x": 0}, ["x", "null"]),
        ({"smooth": 0}, ["smooth", "null"]),
        ({"lora_down": 0}, ["lora_down", "null"]),
        ({"qweight": 0}, ["qweight", "null"]),
        ({"wscales": 0}, ["wscales", "null"]),
        ({"wmins": 0}, ["wmins", "null"]),
        ({"lora_up": 0}, ["lora_up", "null"]),
        ({"y": 0}, ["y", "null"]),
        ({"x": -8}, ["x", "-8"]),
        ({"M": 2**62, "K": 2**10}, ["M", "K", "overflows"]),
    ],
)
def test_native_bad_arguments(override, names):
    case = make_case(2, 6, 128, 4, torch.float32)
    with pytest.raises(ValueError) as info:
        call_native(case, torch.empty(2, 6), **override)
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", str(info.value)), f"{name!r} not in {info.value}"


def test_native_empty_and_null_pointers():
    # Nothing to read or write: 0 pointers are accepted (M = 0, N = 0, R = 0 and no bias).
    _C.linear_w4a16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 128, 4, 0, 1)
    _C.linear_w4a16(0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 128, 4, 0, 1)
    case = make_case(2, 6, 128, 0, torch.float32, has_bias=False)
    y = torch.empty(2, 6)
    call_native(case, y, lora_down=0, lora_up=0)
    truth, bound, _ = exact(*case)
    assert_close(y, truth, F32_TOL * bound, torch.float32)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"K": 100, "ldo": 100}, ["K", "100"]),
        ({"ldo": 64}, ["ldo", "64"]),
        ({"N": -1}, ["N", "-1"]),
        ({"wdtype": 5}, ["wdtype", "5"]),
        ({"odtype": -1}, ["odtype", "-1"]),
        ({"num_threads": 0}, ["num_threads", "0"]),
        ({"qweight": 0}, ["qweight", "null"]),
        ({"wscales": 0}, ["wscales", "null"]),
        ({"wmins": 0}, ["wmins", "null"]),
        ({"out": 0}, ["out", "null"]),
        ({"N": 2**62, "ldo": 2**10, "K": 2**10}, ["N", "ldo", "overflows"]),
    ],
)
def test_dequantize_bad_arguments(override, names):
    _, qw, ws, wm, *_ = make_case(0, 4, 128, 0, torch.float32)
    out = torch.empty(4, 128)
    args = dict(
        qweight=qw.data_ptr(), wscales=ws.data_ptr(), wmins=wm.data_ptr(), smooth=0, out=out.data_ptr(),
        N=4, K=128, ldo=128, wdtype=0, odtype=0, num_threads=1,
    )  # fmt: skip
    args.update(override)
    with pytest.raises(ValueError) as info:
        _C.dequantize_w4a16(**args)
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", str(info.value)), f"{name!r} not in {info.value}"


@pytest.mark.parametrize("m", [1, 40])
def test_the_check_catches_one_swapped_byte(isa, m):
    """One byte's two codes swapped in the op's input (the expected result keeps them), under inputs of size 8
    there: the tolerance of every regime (float32; bfloat16 tiles or panels at 40 rows) sees that pair of terms."""
    x, qw, *rest = make_case(m, 12, 3072, 8, torch.bfloat16, seed=3)
    row = qw[5].int()
    j = int(((row & 0xF) - (row >> 4)).abs().argmax())  # codes k = 2j, 2j + 1 of column 5 differ the most
    x[:, 2 * j], x[:, 2 * j + 1] = 8.0, -8.0
    truth, bound, spread = exact(x, qw, *rest)
    bad = qw.clone()
    bad[5, j] = (qw[5, j] << 4) | (qw[5, j] >> 4)
    y = ops.linear_w4a16(x, bad, *rest)
    with pytest.raises(AssertionError, match="elements off"):
        assert_close(y, truth, scaled_tolerance(x, bound, spread), torch.bfloat16)
