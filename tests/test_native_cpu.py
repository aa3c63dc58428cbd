"""The native CPU kernels (``diffusers_svdquant._C``) against ``reference.py``, on every CPU path.

Codes and scales must equal the reference bit for bit; ``lora_act`` only up to float32 summation
order. Each test runs once per path this CPU supports (``generic`` and, on AVX2 machines,
``avx2``), selected with ``_C.set_cpu_isa``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

_C = pytest.importorskip("diffusers_svdquant._C")
from diffusers_svdquant import reference  # noqa: E402

ISAS = list(_C.supported_cpu_isas())
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
G = reference.GROUP_SIZE
LORA_RTOL = 1e-4


@contextlib.contextmanager
def use_isa(name: str):
    """Selects one CPU path and restores the previous one afterwards."""
    previous = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield name
    finally:
        _C.set_cpu_isa(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    with use_isa(request.param) as name:
        yield name


def make_inputs(m: int, k: int, r: int, dtype: torch.dtype, seed: int = 0):
    """x with planted outliers, an all-zero group and exact rounding ties; smooth in [0.5, 4]."""
    torch.manual_seed(seed)
    x = torch.randn(m, k)
    if m and k:
        n = max(1, m * k // 200)
        idx = torch.randint(0, m * k, (n,))
        x.view(-1)[idx] *= torch.empty(n).uniform_(20, 80)  # activation outliers, as in DiT/UNet layers
    smooth = torch.empty(k).uniform_(0.5, 4.0)
    if m and k >= 2 * G:
        x[m // 2, G : 2 * G] = 0.0  # an all-zero group: scale 0, codes 0, no NaN
    if m and k:
        # With smooth == 1 and absmax 7 the scale is exactly 1, so these hit round-half-to-even ties.
        smooth[:G] = 1.0
        ties = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, -3.5, 3.5, 4.5, -4.5, 5.5, -6.5, 6.5])
        x[0, :G] = 0.25
        x[0, : ties.numel()] = ties
    lora_down = torch.randn(k, r) / math.sqrt(max(k, 1))
    return x.to(dtype), smooth.to(dtype), lora_down.to(dtype)


def run_native(x, smooth, lora_down, num_threads: int | None = None):
    m, k = x.shape
    r = lora_down.shape[1]
    q_x = torch.empty(m, k // 2, dtype=torch.uint8)
    s_x = torch.empty(m, k // G, dtype=torch.float32)
    lora_act = torch.empty(m, r, dtype=torch.float32)
    _C.quantize_act(
        x.data_ptr(), smooth.data_ptr(), lora_down.data_ptr(),
        q_x.data_ptr(), s_x.data_ptr(), lora_act.data_ptr(),
        m, k, r, DTYPE_CODE[x.dtype], G, num_threads or torch.get_num_threads(),
    )  # fmt: skip
    return q_x, s_x, lora_act


def reference_quantize_act(x, smooth, lora_down):
    # The reference is a chain of small torch ops, each an OpenMP fork/join; on a busy machine with
    # few cores those joins wait out scheduler time slices (20x slower seen on 2 cores). One
    # thread keeps the suite fast; the codes and scales do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference.quantize_act(x, smooth, lora_down)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def cached_case(m: int, k: int, r: int, dtype: torch.dtype, seed: int):
    """Inputs and reference outputs, computed once and shared by the parametrized CPU paths."""
    inputs = make_inputs(m, k, r, dtype, seed)
    return inputs, reference_quantize_act(*inputs)


def assert_matches_reference(x, smooth, lora_down, num_threads: int | None = None, expected=None):
    q_x, s_x, lora_act = run_native(x, smooth, lora_down, num_threads)
    q_ref, s_ref, a_ref = expected or reference_quantize_act(x, smooth, lora_down)
    if not torch.equal(s_x, s_ref):
        bad = (s_x != s_ref).nonzero()[:5]
        got, want = s_x[bad[:, 0], bad[:, 1]].tolist(), s_ref[bad[:, 0], bad[:, 1]].tolist()
        raise AssertionError(f"scales differ at {bad.tolist()}: {got} vs {want}")
    if not torch.equal(q_x, q_ref):
        codes, codes_ref = reference.unpack_int4(q_x), reference.unpack_int4(q_ref)
        bad = (codes != codes_ref).nonzero()[:5].tolist()
        raise AssertionError(f"codes differ at {bad} (of {int((codes != codes_ref).sum())})")
    assert not torch.isnan(s_x).any()
    err = (lora_act - a_ref).norm().item()
    scale = a_ref.norm().item()
    assert err <= LORA_RTOL * scale + 1e-30, f"lora_act relative error {err / max(scale, 1e-30):.3g}"


def test_group_size_matches_reference():
    # The kernels' INT4 group (C++ kGroupSize) is the one the Python side quantizes with.
    assert _C.GROUP_SIZE == reference.GROUP_SIZE


# --- quantize_act -------------------------------------------------------------------------------


# The CPU path varies fastest (top decorator), so consecutive tests share a cached reference.
# Ranks: none, below one vector, one ymm (8: staged on zmm), one zmm (16: read directly), and tails.
@pytest.mark.parametrize("isa_name", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [0, 1, 7, 8, 16, 32, 33])
@pytest.mark.parametrize("k", [64, 128, 3072])
@pytest.mark.parametrize("m", [0, 1, 3, 17, 64, 257])
def test_quantize_act_matches_reference(isa_name, m, k, r, dtype):
    inputs, expected = cached_case(m, k, r, dtype, seed=m * 1000 + k + r)
    with use_isa(isa_name):
        assert_matches_reference(*inputs, expected=expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_act_ties_and_zero_group(isa, dtype):
    x, smooth, lora_down = make_inputs(2, 128, 8, dtype)
    q_x, s_x, _ = run_native(x, smooth, lora_down)
    codes = reference.unpack_int4(q_x)
    assert s_x[0, 0].item() == 1.0  # the planted ties: round half to even, not away from zero
    assert codes[0, :14].tolist() == [7, 0, 2, 2, 0, -2, -2, -4, 4, 4, -4, 6, -6, 6]
    assert s_x[1, 1].item() == 0.0  # the planted all-zero group
    assert not codes[1, G:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_act_wide_k(isa, dtype):
    # The widest K of the supported models (Flux MLP down-projection), several K blocks per row.
    assert_matches_reference(*make_inputs(5, 12288, 32, dtype, seed=7))


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
def test_quantize_act_thread_counts(isa, num_threads):
    # More threads than rows or cores must neither change the result nor fail.
    assert_matches_reference(*make_inputs(37, 256, 32, torch.bfloat16, seed=3), num_threads=num_threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_act_subnormal_inputs(isa, dtype):
    # Scales that underflow to 0 (absmax/7 below the smallest subnormal) must give codes 0, and
    # subnormal x̂ must not be flushed: the kernels run without FTZ/DAZ, like torch.
    x, smooth, lora_down = make_inputs(4, 256, 8, torch.float32, seed=11)
    x = x * 1e-39
    x[1, :G] = 1e-45  # the smallest subnormal: absmax/7 rounds to 0
    x[2, G : 2 * G] = torch.linspace(-4e-45, 4e-45, G)
    assert_matches_reference(x.to(dtype), smooth.to(dtype), lora_down.to(dtype))


def test_quantize_act_fp16_extremes(isa):
    # float16 subnormals, the largest finite value and signed zeros all convert exactly.
    torch.manual_seed(5)
    x = torch.randn(3, 128).to(torch.float16)
    x[0, :8] = torch.tensor([6.0e-8, -6.0e-8, 1e-5, -3e-6, 65504.0, -65504.0, 0.0, -0.0])
    x[1] = torch.tensor(2.0**-24)  # all the smallest subnormal
    x[2, :G] = -0.0
    smooth = torch.empty(128).uniform_(0.5, 4.0).to(torch.float16)
    lora_down = torch.randn(128, 9).to(torch.float16)
    assert_matches_reference(x, smooth, lora_down)


def test_quantize_act_zero_k(isa):
    # K = 0: no groups, and the down projection of an empty row is 0.
    x, smooth, lora_down = torch.empty(3, 0), torch.empty(0), torch.empty(0, 4)
    q_x, s_x, lora_act = run_native(x, smooth, lora_down)
    assert q_x.shape == (3, 0) and s_x.shape == (3, 0)
    assert torch.equal(lora_act, torch.zeros(3, 4))


def test_quantize_act_null_pointers_for_empty_tensors(isa):
    # R == 0 and M == 0 leave nothing to read or write: 0 pointers are fine there.
    x, smooth, _ = make_inputs(2, 64, 0, torch.float32)
    q_x = torch.empty(2, 32, dtype=torch.uint8)
    s_x = torch.empty(2, 1)
    _C.quantize_act(x.data_ptr(), smooth.data_ptr(), 0, q_x.data_ptr(), s_x.data_ptr(), 0, 2, 64, 0, 0, G, 1)
    q_ref, s_ref, _ = reference.quantize_act(x, smooth, torch.empty(64, 0))
    assert torch.equal(q_x, q_ref) and torch.equal(s_x, s_ref)
    _C.quantize_act(0, 0, 0, 0, 0, 0, 0, 64, 32, 1, G, 1)


def test_quantize_act_concurrent_calls(isa):
    # The GIL is released during the kernel; concurrent calls must not share scratch memory.
    inputs = [make_inputs(33, 512, 32, torch.bfloat16, seed=s) for s in range(6)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda a: run_native(*a, num_threads=2), inputs))
    for a, out in zip(inputs, outs, strict=True):
        q_ref, s_ref, a_ref = reference_quantize_act(*a)
        assert torch.equal(out[0], q_ref) and torch.equal(out[1], s_ref)
        assert (out[2] - a_ref).norm() <= LORA_RTOL * a_ref.norm()


@settings(max_examples=80, deadline=None)
@given(
    m=st.integers(0, 40),
    groups=st.integers(0, 12),
    r=st.integers(0, 40),
    dtype=st.sampled_from(DTYPES),
    isa_name=st.sampled_from(ISAS),
    seed=st.integers(0, 2**16),
)
def test_quantize_act_hypothesis(m, groups, r, dtype, isa_name, seed):
    with use_isa(isa_name):
        assert_matches_reference(*make_inputs(m, groups * G, r, dtype, seed=seed))


# --- CPU path selection -------------------------------------------------------------------------


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_supported_isas():
    assert ISAS[0] == "generic"
    assert len(set(ISAS)) == len(ISAS)
    assert isinstance(_C.has_cuda(), bool)
    flags = _cpuinfo_flags()
    if flags is not None and os.uname().machine == "x86_64":
        # The kernel only lists avx2 when the OS also saves YMM state, so this agrees with XCR0.
        assert ("avx2" in ISAS) == ({"avx2", "fma", "f16c"} <= flags)


def test_known_isas_are_built_and_gated_by_cpuid():
    """x86-64 builds carry every path (VNNI ones when the compiler knows the flags); only those this CPU
    reports are supported, and the others are refused as unsupported, not unknown."""
    known = _C.known_cpu_isas()
    assert known[0] == "generic" and set(ISAS) <= set(known)
    if os.uname().machine == "x86_64":
        assert {"avx2", "avxvnni", "avx512vnni"} <= set(known)
    flags = _cpuinfo_flags()
    if flags is not None and os.uname().machine == "x86_64":
        assert ("avxvnni" in ISAS) == ({"avx_vnni", "avx2", "fma", "f16c"} <= flags)
        assert ("avx512vnni" in ISAS) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags)
        if "avx512bf16" in known:
            bf16 = {"avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
            assert ("avx512bf16" in ISAS) == (bf16 <= flags)
        if "amx" in known:  # the kernel lists amx_tile only when it saves the tile state (and grants it)
            amx = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
            assert ("amx" in ISAS) == (amx <= flags)
    for name in set(known) - set(ISAS):
        with pytest.raises(ValueError, match="not supported by this CPU"):
            _C.set_cpu_isa(name)


def test_default_isa_is_best_supported():
    # A fresh process, without SVDQ_CPU_ISA, starts on the best path.
    # The extension is loaded on its own, without the package's __init__ (and diffusers).
    env = {k: v for k, v in os.environ.items() if k != "SVDQ_CPU_ISA"}
    code = (
        "import importlib.util as u\n"
        f"s = u.spec_from_file_location('diffusers_svdquant._C', {_C.__file__!r})\n"
        "C = u.module_from_spec(s)\n"
        "s.loader.exec_module(C)\n"
        "print(C.cpu_isa(), C.supported_cpu_isas()[-1])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    current, best = out.stdout.split()[-2:]
    assert current == best


def test_set_cpu_isa_roundtrip():
    previous = _C.cpu_isa()
    try:
        for name in ISAS:
            _C.set_cpu_isa(name)
            assert _C.cpu_isa() == name
    finally:
        _C.set_cpu_isa(previous)


@pytest.mark.parametrize("name", ["nope", "", "AVX2", "avx512vnni"])
def test_set_cpu_isa_rejects(name):
    if name in ISAS:
        pytest.skip(f"{name} is supported here")
    previous = _C.cpu_isa()
    with pytest.raises(ValueError, match=re.escape(f"'{name}'")) as info:
        _C.set_cpu_isa(name)
    assert "generic" in str(info.value)  # the message lists what is supported
    assert _C.cpu_isa() == previous


# --- bad arguments ------------------------------------------------------------------------------


def _qa_args(**over):
    """Valid quantize_act arguments for M=2, K=64, R=4 with a per-test override."""
    x, smooth, lora_down = make_inputs(2, 64, 4, torch.float32)
    q_x = torch.empty(2, 32, dtype=torch.uint8)
    s_x = torch.empty(2, 1)
    lora_act = torch.empty(2, 4)
    args = dict(
        x=x.data_ptr(), smooth=smooth.data_ptr(), lora_down=lora_down.data_ptr(),
        q_x=q_x.data_ptr(), s_x=s_x.data_ptr(), lora_act=lora_act.data_ptr(),
        M=2, K=64, R=4, dtype=0, group_size=G, num_threads=1,
    )  # fmt: skip
    args.update(over)
    keep = (x, smooth, lora_down, q_x, s_x, lora_act)  # the pointers stay valid while these live
    return args, keep


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"group_size": 32}, ["group_size", "32"]),
        ({"group_size": 128, "K": 128}, ["group_size", "128"]),
        ({"K": 100}, ["K", "100"]),
        ({"K": 63}, ["K", "63"]),
        ({"K": -64}, ["K", "-64"]),
        ({"M": -1}, ["M", "-1"]),
        ({"R": -2}, ["R", "-2"]),
        ({"dtype": 3}, ["dtype", "3"]),
        ({"dtype": -1}, ["dtype", "-1"]),
        ({"num_threads": 0}, ["num_threads", "0"]),
        ({"x": 0}, ["x"]),
        ({"smooth": 0}, ["smooth"]),
        ({"lora_down": 0}, ["lora_down"]),
        ({"q_x": 0}, ["q_x"]),
        ({"s_x": 0}, ["s_x"]),
        ({"lora_act": 0}, ["lora_act"]),
        ({"x": -8}, ["x", "-8"]),
        ({"M": 2**62, "K": 2**10}, ["M", "K"]),
    ],
)
def test_quantize_act_bad_arguments(override, names):
    args, _keep = _qa_args(**override)
    with pytest.raises(ValueError) as info:
        _C.quantize_act(**args)
    msg = str(info.value)
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", msg), f"{name!r} not named in: {msg}"


# --- first_nonfinite: the load-time integrity scan -------------------------------------------------------

# Bit patterns per dtype: (non-finite ones, finite extremes), so the scan is checked on its exponent test,
# not only on torch's nan / inf.
_NONFINITE_BITS = {
    torch.float32: ([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF], [0x7F7FFFFF, 0xFF7FFFFF, 0x1]),
    torch.bfloat16: ([0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF], [0x7F7F, 0xFF7F, 0x0001]),
    torch.float16: ([0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF], [0x7BFF, 0xFBFF, 0x0001]),
}
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_CHUNK = 1 << 18  # finite.cpp's chunk: the positions around it cross a thread's share


def _with_bits(t: torch.Tensor, index: int, bits: int) -> torch.Tensor:
    width = 32 if t.dtype == torch.float32 else 16
    signed = bits - (1 << width) if bits >= 1 << (width - 1) else bits
    t.view(_INT_VIEW[t.dtype]).view(-1)[index] = signed
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [0, _CHUNK - 1, _CHUNK, 2 * _CHUNK + 5], ids=lambda w: f"at{w}")
@pytest.mark.parametrize("threads", [1, 2])
def test_first_nonfinite_finds_every_non_finite_pattern(dtype, where, threads):
    bad_bits, finite_bits = _NONFINITE_BITS[dtype]
    tensors = [torch.randn(7, dtype=dtype), torch.randn(2 * _CHUNK + 6, dtype=dtype), torch.randn(3, dtype=dtype)]
    for i, bits in enumerate(finite_bits):
        _with_bits(tensors[1], where + i if where + i < tensors[1].numel() else i, bits)
    ptrs, numel, codes = [t.data_ptr() for t in tensors], [t.numel() for t in tensors], [DTYPE_CODE[dtype]] * 3
    assert _C.first_nonfinite(ptrs, numel, codes, threads) == -1
    for bits in bad_bits:
        t = tensors[1].clone()
        _with_bits(t, where, bits)
        assert _C.first_nonfinite([ptrs[0], t.data_ptr(), ptrs[2]], numel, codes, threads) == 1, hex(bits)
        assert _C.first_nonfinite([t.data_ptr(), t.data_ptr()], [numel[1]] * 2, codes[:2], threads) == 0


def test_first_nonfinite_mixed_dtypes_strided_and_empty():
    from diffusers_svdquant import ops

    finite = [torch.randn(5, 3).t(), torch.zeros(0), torch.randn(64, dtype=torch.bfloat16)]
    assert ops.first_nonfinite(finite) == -1
    assert ops.first_nonfinite([]) == -1
    for i, value in ((0, float("nan")), (2, float("inf"))):
        tensors = [t.clone() for t in finite]  # tensors[0] stays strided: the torch fallback path
        tensors[i][(-1,) * tensors[i].dim()] = value
        assert ops.first_nonfinite(tensors) == i
    # Strided finite values whose norm overflows float32 are finite (the fallback's exact re-check).
    assert ops.first_nonfinite([torch.full((4, 2), 3e38)[:, 0]]) == -1


def test_first_nonfinite_bad_input():
    with pytest.raises(ValueError, match="first_nonfinite: data, numel and dtypes must have the same length"):
        _C.first_nonfinite([0], [], [0], 1)
    with pytest.raises(ValueError, match="first_nonfinite: data is a null pointer but holds 4 elements"):
        _C.first_nonfinite([0], [4], [0], 1)
    with pytest.raises(ValueError, match="first_nonfinite: dtypes must be 0"):
        _C.first_nonfinite([8], [0], [3], 1)


# --- FiniteScan: the same test over byte ranges of a file, read on a background thread ---------------------


def _file_of(tmp_path, parts, lead=b"hdr!"):
    """``parts`` written one after another behind ``lead`` bytes; the file and each part's (offset, numel, dtype)."""
    f = tmp_path / "scan.bin"
    f.write_bytes(lead + b"".join(p.view(torch.uint8).numpy().tobytes() for p in parts))
    offsets = torch.tensor([len(lead)] + [p.numel() * p.element_size() for p in parts]).cumsum(0).tolist()
    return f, [(offsets[i], p.numel(), p.dtype) for i, p in enumerate(parts)]


@pytest.mark.parametrize("native_library", [True, False], ids=["C", "no_C"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_scan_names_every_damaged_range(dtype, native_library, tmp_path, monkeypatch):
    from diffusers_svdquant import ops
    from diffusers_svdquant.ops import native

    if not native_library:
        monkeypatch.setattr(native, "_C", None)
    # 2**18 bytes is the native thread's read block: a range across it, and damage past its first block.
    parts = [torch.randn(n, dtype=dtype) for n in (7, 2 * _CHUNK + 6, 0, 3, 64, (1 << 18) // dtype.itemsize + 5)]
    for i, where, bits in ((1, -1, _NONFINITE_BITS[dtype][0][3]), (4, -1, _NONFINITE_BITS[dtype][0][1]),
                           (5, (1 << 18) // dtype.itemsize + 2, _NONFINITE_BITS[dtype][0][0])):  # fmt: skip
        _with_bits(parts[i], where % parts[i].numel(), bits)
    f, ranges = _file_of(tmp_path, parts)
    assert ops.FiniteScan(f, ranges).finish() == [1, 4, 5]
    scan = ops.FiniteScan(str(f), [ranges[0], ranges[3], ranges[2]])
    assert scan.finish() == [] and scan.finish() == []
    assert ops.FiniteScan(f, []).finish() == []
    # Ranges may overlap and come in any order: each is read on its own.
    assert ops.FiniteScan(f, [ranges[4], ranges[0], ranges[4]]).finish() == [0, 2]


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([(0, 2, torch.int32)], r"FiniteScan: range 0 has dtype torch.int32"),
        ([(0, 1, torch.float32), (6, 2, torch.float16)],
         r"FiniteScanner: range 1 \(2 elements of 2 bytes at byte 6\) is not an aligned part of .*scan.bin"
         r" \(8 bytes\)"),
        ([(2, 1, torch.float32)], r"FiniteScanner: range 0 .* not an aligned part"),
        ([(-2, 1, torch.float16)], r"FiniteScanner: range 0 .* not an aligned"),
        ([(10, 0, torch.float16)], r"FiniteScanner: range 0 .* not an aligned"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("native_library", [True, False], ids=["C", "no_C"])
def test_finite_scan_bad_input(ranges, message, native_library, tmp_path, monkeypatch):
    from diffusers_svdquant import ops
    from diffusers_svdquant.ops import native

    if not native_library:
        monkeypatch.setattr(native, "_C", None)
    (tmp_path / "scan.bin").write_bytes(bytes(8))
    with pytest.raises(ValueError, match=message):
        ops.FiniteScan(tmp_path / "scan.bin", ranges)
    with pytest.raises(ValueError, match=r"FiniteScanner: cannot open .*missing.bin"):
        ops.FiniteScan(tmp_path / "missing.bin", [])


def test_finite_scanner_bad_input(tmp_path):
    (tmp_path / "f").write_bytes(bytes(8))
    with pytest.raises(ValueError, match="FiniteScanner: offsets, numel and dtypes must have the same length"):
        _C.FiniteScanner(str(tmp_path / "f"), [0], [], [0])
    with pytest.raises(ValueError, match="FiniteScanner: dtypes must be 0"):
        _C.FiniteScanner(str(tmp_path / "f"), [0], [1], [7])
    with pytest.raises(ValueError, match=r"FiniteScanner: range 0 \(3 elements of 4 bytes at byte 0\) is not an"):
        _C.FiniteScanner(str(tmp_path / "f"), [0], [3], [0])


def test_finite_scanner_file_that_shrinks_while_read(tmp_path):
    # A sparse 512 MiB file: the thread takes tens of ms to read its holes, so it is still at the first range
    # when the file is cut to nothing, and its read fails rather than testing bytes that are gone.
    f = tmp_path / "big.bin"
    with open(f, "wb") as h:
        h.truncate(512 << 20)
    scanner = _C.FiniteScanner(str(f), [0, (512 << 20) - 4], [(256 << 20) // 4, 1], [0, 0])
    with open(f, "r+b") as h:
        h.truncate(0)
    with pytest.raises(RuntimeError, match=r"FiniteScanner: cannot read .*big.bin at byte"):
        scanner.finish()
    with pytest.raises(RuntimeError, match="cannot read"):
        scanner.finish()


def test_finite_scanner_dropped_unfinished_stops_its_thread(tmp_path):
    # A loader that fails early drops its scan: the destructor stops the thread at its next 256 KiB block
    # instead of waiting for the rest of the file (here 1 GiB of holes, tens of ms to read).
    f = tmp_path / "big.bin"
    with open(f, "wb") as h:
        h.truncate(1 << 30)
    ranges = ([0], [(1 << 30) // 2], [1])
    start = time.perf_counter()
    assert _C.FiniteScanner(str(f), *ranges).finish() == []
    whole = time.perf_counter() - start
    scanner = _C.FiniteScanner(str(f), *ranges)
    start = time.perf_counter()
    del scanner
    assert time.perf_counter() - start < whole / 4, whole
