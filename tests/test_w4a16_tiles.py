"""The W4A16 tile kernels (``_C.linear_w4a16(..., tiles=True)``: AMX-BF16 tiles on the ``amx`` CPU path,
cpp/cpu/w4a16_amx.cpp; zmm ``vdpbf16ps`` on the ``avx512bf16`` path, cpp/cpu/w4a16_dpbf16.cpp; one driver,
cpp/cpu/w4a16_bf16_driver.inc) against the float64 result, called directly (every row count, not only those the op
hands it) and through the op, on each of the two paths this CPU runs.

The kernel rounds x̂, W, lora_act and lora_up to bfloat16 and sums in float32: the tolerance is the bfloat16
one of tests/test_weight_only.py (``2⁻⁵ · spread`` per element, ``2⁻⁶ · ‖spread‖`` in norm), whatever the dtype
of the tensors it reads. Shapes cover the kernel's edges: m tiles of 16 (1, 15, 16, 17, 33 rows: one and two B
tiles per pass; the zmm engine's register blocks of 6 m tiles and the 1 to 5 left), n blocks of 32 (1, 31, 33,
200 columns), runs of 8 (AMX) or 4 (zmm) tile steps, the low-rank columns (R = 0,
5, 32, 40: one or two extra steps), K = 0, K chunks (K = 12288 with 300 rows: x̂ᵀ beyond the chunk size), and
row blocks (more than 384 rows run as equal blocks of whole m tiles, one pass each).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_weight_only import BF16_NORM_TOL, BF16_PANEL_TOL, DTYPES, G, assert_close, exact, make_case, on_isa

from diffusers_svdquant import ops
from diffusers_svdquant.ops import native, weight_only

TILE_ISAS = [i for i in ops.supported_cpu_isas() if i in ("avx512bf16", "amx")]
pytestmark = pytest.mark.skipif(not TILE_ISAS, reason="no W4A16 tile kernel (AVX512-BF16) on this CPU or build")
on_each_tile_isa = pytest.mark.parametrize("isa", TILE_ISAS)


def tiles(case, threads=2):
    """``_C.linear_w4a16`` on the tile kernel, every float tensor in the case's dtype."""
    x, qw, ws, wm, sm, ld, lu, b = case
    (m, k), n, r = x.shape, qw.shape[0], ld.shape[1]
    y = torch.empty(m, n, dtype=x.dtype)
    native._C.linear_w4a16(
        x.data_ptr(), sm.data_ptr(), ld.data_ptr(), qw.data_ptr(), ws.data_ptr(), wm.data_ptr(), lu.data_ptr(),
        0 if b is None else b.data_ptr(), y.data_ptr(), m, n, k, r, native.DTYPE_CODES[x.dtype], threads,
        tiles=True,
    )  # fmt: skip
    return y


def check_tiles(case, isa, threads=2):
    truth, _, spread = exact(*case)
    with on_isa(isa):
        y = tiles(case, threads)
    assert_close(y, truth, BF16_PANEL_TOL * spread, case[0].dtype, BF16_NORM_TOL, norm_ref=spread)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [0, 5, 32, 40])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (31, 128), (33, 576), (200, 3072)])
@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 100, 113, 161])
@on_each_tile_isa
def test_tiles_match_exact(isa, m, n, k, r, dtype):
    check_tiles(make_case(m, n, k, r, dtype, (m + n + r) % 2 == 1, m * 7 + n + k), isa)


@pytest.mark.parametrize(("m", "r"), [(5, 32), (300, 8)])
@on_each_tile_isa
def test_tiles_wide_k(isa, m, r):
    # 300 rows of K = 12288: the packed x̂ᵀ (7.3 MiB) is cut into K chunks, C waits in memory between them.
    check_tiles(make_case(m, 40, 12288, r, torch.bfloat16, seed=m), isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k", "r"), [(385, 192, 32), (1000, 128, 5), (700, 12288, 0)])
@on_each_tile_isa
def test_tiles_row_blocks(isa, m, k, r, dtype):
    # 385 rows: blocks of 224 and 161; 1000: 352, 352, 296; 700 of K = 12288: 352 and 348, each in K chunks.
    case = make_case(m, 37, k, r, dtype, has_bias=True, seed=m)
    check_tiles(case, isa)
    # Each block is the kernel on those rows alone: the same bits, so the rows' pointers are offset right.
    x, *rest = case
    blocks = math.ceil(m / 384)
    rows = math.ceil(math.ceil(m / blocks) / 32) * 32
    with on_isa(isa):
        whole = tiles(case)
        for m0 in range(0, m, rows):
            assert torch.equal(whole[m0 : m0 + rows], tiles((x[m0 : m0 + rows], *rest))), m0


@pytest.mark.parametrize("r", [0, 3])
@on_each_tile_isa
def test_tiles_empty_k(isa, r):
    # K = 0: y is the low-rank branch (zero: lora_act of no input) plus the bias.
    case = make_case(3, 20, 0, r, torch.bfloat16, has_bias=True, seed=1)
    with on_isa(isa):
        y = tiles(case)
    assert torch.equal(y, case[-1].expand(3, 20))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@on_each_tile_isa
def test_tiles_thread_counts(isa, threads):
    # More threads than blocks of 32 columns (70 columns: 3 blocks) or cores: the same result.
    check_tiles(make_case(20, 70, 256, 8, torch.bfloat16, seed=threads), isa, threads)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 120),
    n=st.integers(1, 80),
    groups=st.integers(1, 12),
    r=st.integers(0, 40),
    dtype=st.sampled_from(DTYPES),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
# Found by hypothesis: the planted x40 column cancels to 15.8 against a spread of 294; its error (0.75) is within
# the element bound but was 2⁻⁴ of ‖truth‖ when the norm check measured against the result instead of the spread.
@example(m=1, n=20, groups=1, r=0, dtype=torch.float32, has_bias=False, seed=20)
@on_each_tile_isa
def test_tiles_hypothesis(isa, m, n, groups, r, dtype, has_bias, seed):
    check_tiles(make_case(m, n, groups * G, r, dtype, has_bias, seed), isa)


@on_each_tile_isa
def test_op_takes_tiles_for_many_bf16_rows(isa):
    with on_isa(isa):
        after = weight_only.TILES_AFTER_ROWS[isa]
        assert weight_only.cpu_regime(after + 1, torch.bfloat16) == "tiles"
        assert weight_only.cpu_regime(after, torch.bfloat16) == "gemv_bf16"
        # float32 and float16 keep their precision: never the bfloat16 tiles.
        assert weight_only.cpu_regime(100, torch.float32) == "panels"
        assert weight_only.cpu_regime(100, torch.float16) == "panels"
        case = make_case(after + 1, 50, 256, 8, torch.bfloat16, seed=3)
        assert torch.equal(ops.linear_w4a16(*case), tiles(case, torch.get_num_threads()))
    with on_isa("avx512vnni"):  # no tiles: the few-rows GEMV, then panels
        assert weight_only.cpu_regime(after + 1, torch.bfloat16) == "gemv_bf16"
        assert weight_only.cpu_regime(weight_only.GEMV_MAX_ROWS[torch.bfloat16] + 1, torch.bfloat16) == "panels"


def test_every_tile_path_has_its_switch():
    # A path with a tile kernel and no entry in TILES_AFTER_ROWS would fail at its first bfloat16 call of many rows.
    for isa in ops.supported_cpu_isas():
        with on_isa(isa):
            assert native._C.w4a16_tiles_available() == (isa in weight_only.TILES_AFTER_ROWS), isa


def test_tiles_refused_on_a_path_without_them():
    case = make_case(2, 6, 128, 4, torch.bfloat16)
    with on_isa("avx512vnni"), pytest.raises(ValueError, match="avx512vnni.*no tile kernel"):
        tiles(case)
