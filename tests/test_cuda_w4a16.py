"""The weight-only W4A16 CUDA kernels (cpp/cuda/gemv_w4a16.cu, gemm_w4a16.cu) and ``ops.cuda_w4a16``.

Run anywhere (no GPU needed):
  * ``nibbles_to_float`` (w4a16.cuh): its magic constants give every code in every position exactly;
  * a CPU emulation of one GEMM block and one 64-group: the swizzled cp.async tile of x, the per-thread
    dequantization into the swizzled 16-bit weight tile, the ldmatrix.x4 addresses of A and B, fed through
    the PTX ISA's mma.m16n8k16 fragment layouts (transcribed below independently of the kernel) and the
    epilogue's accumulator -> output map, against x @ W'ᵀ; bank-conflict freedom of those accesses;
  * numpy mirrors of the GEMV's data flow (permuted x̂ in shared memory, k lanes / column lanes, per-32-k
    scaling, xor reduction, split-K slices and the rows each lane stores) and of the prologue's (x̂, its
    32-k sums, 1 / smooth, row / rank tiles, the split-K sum of x̂ lora_down) against the reference;
  * the launch plan (``_C.cuda_w4a16_plan``: a pure function of the sizes and the SM count), the binding's
    argument checks (ValueError before any CUDA call), a clean RuntimeError without a GPU, and the Python
    wrapper's dispatch with the native entry points replaced by fakes.

Marked ``cuda`` and skipped without a GPU: the op vs ``reference.linear_w4a16`` over M = 0, 1, 7, 16, 17,
256, 1024, N tails, K from 64 to 12288, r = 0 / 32, with and without bias, bf16 and fp16, both kernels
forced on the same sizes, non-contiguous inputs, opcheck, and the error messages.

Tolerance (GPU): ``1e-5 * Σ|terms| + u_w * Σ|x̂ W| + u_out * |y|``: float32 summation order, plus for
the GEMM the rounding of the dequantized weight W / smooth to the 16-bit dtype (``u_w`` = 2^-8 bf16,
2^-11 fp16; the GEMV keeps it in float32, ``u_w`` = 0), plus the output's rounding.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_svdquant import ops, reference
from diffusers_svdquant.ops import cuda_w4a16, native

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
needs_kernels = pytest.mark.skipif(not ops.cuda_kernels_available(), reason="_C built without CUDA kernels")
U_OUT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U_W = U_OUT  # the GEMM rounds W / smooth to the model dtype once


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w4a16_args(m, n, k, r, has_bias, dtype, seed=0):
    """(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias) on the CPU: a quantized random layer."""
    g = _gen(seed)
    codes, wscales, wmins = reference.quantize_groups_affine(torch.randn(n, k, generator=g) * 0.05, param_dtype=dtype)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    x[:, :64] *= 20  # an outlier group
    smooth = (torch.rand(k, generator=g) * 2 + 0.25).to(dtype)
    lora_down = (torch.randn(k, r, generator=g) * 0.1).to(dtype)
    lora_up = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    return x, reference.pack_int4(codes), wscales, wmins, smooth, lora_down, lora_up, bias


# ------------------------------------------------------------------------- nibbles -> float (exact)
# Mirror of w4a16.cuh nibbles_to_float (change both together): (mask, bits of 2^(23-4e), 2^(23-4e)).
_MAGIC = [(0x000F, 0x4B000000, 8388608.0), (0x00F0, 0x49000000, 524288.0), (0x0F00, 0x47000000, 32768.0),
          (0xF000, 0x45000000, 2048.0)]  # fmt: skip


def _nibbles_to_float(words: np.ndarray) -> np.ndarray:
    """uint32 [...] -> float32 [..., 8], in float32 arithmetic as the kernel does it."""
    words = words.astype(np.uint32)
    out = []
    for half in (words, words >> np.uint32(16)):
        for mask, magic, offset in _MAGIC:
            bits = (half & np.uint32(mask)) | np.uint32(magic)
            out.append(bits.view(np.float32) - np.float32(offset))
    return np.stack(out, -1)


def test_nibbles_to_float_is_exact():
    """Every 16-bit pattern in both halves of a word gives its four codes exactly, in element order."""
    low = np.arange(1 << 16, dtype=np.uint32)
    high = np.random.default_rng(0).integers(0, 1 << 16, 1 << 16, dtype=np.uint32)
    for words in (low | (high << np.uint32(16)), high | (low << np.uint32(16))):
        got = _nibbles_to_float(words)
        want = reference.unpack_uint4(torch.from_numpy(words.view(np.uint8).copy()).reshape(-1, 4)).numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))


# ------------------------------------------------ CPU emulation of one GEMM block (gemm_w4a16.cu)
# PTX ISA "Matrix Fragments for mma.m16n8k16" (.bf16 / .f16), gid = lane >> 2, tig = lane % 4; element i of
# a fragment is 16-bit half i % 2 (low first) of register i // 2.


def _isa_a(lane: int, i: int) -> tuple[int, int]:  # a_i, i < 8 -> (row of 16, k of 16)
    gid, tig = lane >> 2, lane & 3
    return gid + (8 if i in (2, 3, 6, 7) else 0), tig * 2 + (i & 1) + (8 if i >= 4 else 0)


def _isa_b(lane: int, i: int) -> tuple[int, int]:  # b_i, i < 4 -> (k of 16, col of 8)
    gid, tig = lane >> 2, lane & 3
    return tig * 2 + (i & 1) + (8 if i >= 2 else 0), gid


def _isa_c(lane: int, i: int) -> tuple[int, int]:  # c_i, i < 4 -> (row of 16, col of 8)
    gid, tig = lane >> 2, lane & 3
    return gid + (8 if i >= 2 else 0), tig * 2 + (i & 1)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _from_bits(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    bits = np.asarray(bits, np.uint16)
    if dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def _fma32(a, b, c) -> np.ndarray:
    """fmaf in float32 (the float64 product of a 4-bit code and a float32 is exact)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


# Mirrors of gemm_w4a16.cu (change both together).
def _swz(row: int, c: int) -> int:
    return row * 128 + ((c ^ (row & 7)) << 4)


def _ldmatrix_x4(smem: bytes, addr: list[int]) -> list[list[int]]:
    """Register j of lane l: 4 bytes at 4 (l % 4) of the row whose address lane 8j + l // 4 gave."""
    return [[int.from_bytes(smem[addr[8 * j + (lane >> 2)] + 4 * (lane & 3) :][:4], "little") for j in range(4)]
            for lane in range(32)]  # fmt: skip


def _mma(a_regs, b_regs, dtype) -> np.ndarray:
    """D = A @ B (float64) with A [16, 16] and B [16, 8] rebuilt from 32 lanes' registers via the ISA."""
    a, b = np.zeros((16, 16), np.uint16), np.zeros((16, 8), np.uint16)
    for lane in range(32):
        for i in range(8):
            a[_isa_a(lane, i)] = (a_regs[lane][i // 2] >> (16 * (i & 1))) & 0xFFFF
        for i in range(4):
            b[_isa_b(lane, i)] = (b_regs[lane][i // 2] >> (16 * (i & 1))) & 0xFFFF
    return _from_bits(a, dtype) @ _from_bits(b, dtype)


def _emulate_gemm_block(x_tile, qbytes, s, m, inv, bm: int, dtype) -> np.ndarray:
    """One group (64 k) of one block: float64 [bm, 128] outputs at the positions the epilogue stores them."""
    smem_a = bytearray(bm * 128)  # load_stage: chunk c of row `row` at _swz(row, c)
    xb = _bits(x_tile)
    for row in range(bm):
        for c in range(8):
            smem_a[_swz(row, c) : _swz(row, c) + 16] = xb[row, 8 * c : 8 * c + 8].tobytes()
    dq = bytearray(128 * 128)  # dequant: thread tid -> row tid / 2, k 32 (tid % 2) ..
    for tid in range(256):
        dn, dh = tid >> 1, tid & 1
        q = _nibbles_to_float(qbytes[dn, 16 * dh : 16 * dh + 16].copy().view("<u4"))
        for j in range(4):
            w = _fma32(q[j], s[dn], m[dn]) * inv[32 * dh + 8 * j : 32 * dh + 8 * j + 8]
            dq[_swz(dn, dh * 4 + j) : _swz(dn, dh * 4 + j) + 16] = _bits(torch.from_numpy(w).to(dtype)).tobytes()
    out = np.full((bm, 128), np.nan)
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        d = np.zeros((bm // 32, 4, 16, 8))
        for ks in range(4):
            a = [_ldmatrix_x4(smem_a, [_swz(wm * (bm // 2) + ((lane >> 3) & 1) * 8 + (lane & 7) + mi * 16,
                                            2 * ks + (lane >> 4)) for lane in range(32)])
                 for mi in range(bm // 32)]  # fmt: skip
            b = [[None] * 4 for _ in range(32)]
            for pp in range(2):
                r = _ldmatrix_x4(dq, [_swz(wn * 32 + (lane >> 4) * 8 + (lane & 7) + pp * 16, 2 * ks + ((lane >> 3) & 1))
                                      for lane in range(32)])  # fmt: skip
                for lane in range(32):
                    b[lane][2 * pp], b[lane][2 * pp + 1] = r[lane][0:2], r[lane][2:4]
            for mi in range(bm // 32):
                for nj in range(4):
                    d[mi, nj] += _mma(a[mi], [b[lane][nj] for lane in range(32)], dtype)
        for mi in range(bm // 32):
            for nj in range(4):
                for lane in range(32):
                    gid, tig = lane >> 2, lane & 3
                    for c in range(4):  # the epilogue's (row, col) of acc[mi][nj][c]
                        row = wm * (bm // 2) + mi * 16 + (c >> 1) * 8 + gid
                        col = wn * 32 + nj * 8 + tig * 2 + (c & 1)
                        out[row, col] = d[mi, nj][_isa_c(lane, c)]
    return out


@pytest.mark.parametrize(("bm", "dtype"), [(64, torch.bfloat16), (128, torch.float16)])
def test_emulated_gemm_block_computes_x_times_dequantized_weight(bm, dtype):
    """The fragments the kernel builds, through the ISA's mma semantics and the epilogue map, give
    x_tile @ W'ᵀ for every (row, column) of the block, W' = round((q s + m) / smooth) from canonical indexing."""
    g = _gen(bm)
    x_tile = torch.randn(bm, 64, generator=g).to(dtype)
    qbytes = torch.randint(0, 256, (128, 32), generator=g, dtype=torch.uint8)
    s = (torch.rand(128, generator=g) * 0.1).to(dtype).float().numpy()
    m = (-torch.rand(128, generator=g) * 0.5).to(dtype).float().numpy()
    inv = (1 / (torch.rand(64, generator=g) + 0.5)).float().numpy()
    got = _emulate_gemm_block(x_tile, qbytes.numpy(), s, m, inv, bm, dtype)
    codes = reference.unpack_uint4(qbytes).numpy()
    w = torch.from_numpy(_fma32(codes, s[:, None], m[:, None]) * inv[None, :]).to(dtype).double()
    want = x_tile.double().numpy() @ w.numpy().T
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gemm_swizzle_is_bank_conflict_free():
    """Each 8-row matrix of an ldmatrix, and each 8-lane phase of the dequantized tile's 16-byte stores,
    touches 8 distinct 16-byte bank groups (32 banks of 4 bytes)."""
    for base in range(0, 128, 8):
        for c in range(8):
            assert len({(_swz(base + r, c) // 16) % 8 for r in range(8)}) == 8
    for j in range(4):
        for phase in range(0, 256, 8):  # threads tid..tid+7: rows tid/2.., halves tid%2
            assert len({(_swz(t >> 1, (t & 1) * 4 + j) // 16) % 8 for t in range(phase, phase + 8)}) == 8


# ----------------------------------------------------------- numpy mirror of the GEMV (gemv_w4a16.cu)


def _gemv_mirror(x, smooth, qweight, wscales, wmins, kslice: int, ksplit: int):
    """gemv_kernel's data flow without lora / bias: float64 [M, N] (slices summed in order) and how many
    times each (slice, row, column) was stored."""
    mrows, k = x.shape
    n = qweight.shape[0]
    mt = 1 << (mrows - 1).bit_length()
    xhat = (x.float() / smooth.float()).numpy()  # the prologue's IEEE division
    xsum = xhat.reshape(mrows, k // 32, 32).astype(np.float64).sum(-1)
    words = qweight.numpy().view("<u4")  # [N, K / 8]
    sc, mn = wscales.float().numpy(), wmins.float().numpy()
    partial, stored = np.zeros((ksplit, mrows, n)), np.zeros((ksplit, mrows, n), np.int64)
    for by in range(ksplit):
        kb0 = by * kslice
        klen = min(k - kb0, kslice)
        xh_s, xs_s = np.zeros((mt, kslice)), np.zeros((mt, kslice // 32))
        for kk in range(0, klen, 4):  # the cp.async copy's permutation
            dst = (kk & ~255) + ((kk >> 2) & 7) * 32 + ((kk >> 5) & 7) * 4
            xh_s[:mrows, dst : dst + 4] = xhat[:, kb0 + kk : kb0 + kk + 4]
        xs_s[:mrows, : -(-klen // 32)] = xsum[:, kb0 // 32 : kb0 // 32 + -(-klen // 32)]
        for bx in range(-(-n // 32)):
            for warp in range(4):
                for c in range(2):
                    lane_acc = np.zeros((32, mt))
                    for lane in range(32):
                        kl, cl = lane & 7, lane >> 3
                        col = min(bx * 32 + warp * 8 + cl * 2 + c, n - 1)
                        for s in range(-(-klen // 256)):
                            kk = s * 256 + kl * 32
                            if kk >= klen:
                                continue
                            q = _nibbles_to_float(words[col, (kb0 + kk) // 8 : (kb0 + kk) // 8 + 4])
                            xrow = s * 256 + kl * 4
                            t = np.zeros(mt)
                            for j in range(4):
                                t += xh_s[:, xrow + 2 * j * 32 : xrow + 2 * j * 32 + 4] @ q[j, :4]
                                t += xh_s[:, xrow + (2 * j + 1) * 32 : xrow + (2 * j + 1) * 32 + 4] @ q[j, 4:]
                            grp = (kb0 + kk) // 64
                            lane_acc[lane] += sc[col, grp] * t + mn[col, grp] * xs_s[:, s * 8 + kl]
                    for lane in range(32):  # xor-reduced over the 8 k lanes; k lane kl stores rows kl, kl + 8
                        kl, cl = lane & 7, lane >> 3
                        col = bx * 32 + warp * 8 + cl * 2 + c
                        total = lane_acc[8 * cl : 8 * cl + 8].sum(0)
                        for mm in range(mt):
                            if col < n and mm < mrows and (mm & 7) == kl:
                                partial[by, mm, col] = total[mm]
                                stored[by, mm, col] += 1
    return partial.sum(0), stored


@pytest.mark.parametrize(("m", "n", "k", "kslice", "ksplit"), [(1, 33, 320, 512, 1), (3, 40, 640, 512, 2),
                                                                (9, 8, 1088, 768, 2)])  # fmt: skip
def test_gemv_mirror_matches_reference(m, n, k, kslice, ksplit):
    """The GEMV's indexing (partial steps and slices, inactive k lanes, rows past M, columns past N) stores
    every output once per slice and reproduces reference.linear_w4a16 without the low-rank branch."""
    x, qweight, wscales, wmins, smooth, lora_down, lora_up, _ = _w4a16_args(m, n, k, 0, False, torch.float32)
    got, stored = _gemv_mirror(x, smooth, qweight, wscales, wmins, kslice, ksplit)
    assert (stored == 1).all()
    xs = x.double() / smooth.double()
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qweight), wscales, wmins).double()
    want, mag = (xs @ w.t()).numpy(), (xs.abs() @ w.abs().t()).numpy()
    assert (np.abs(got - want) <= 1e-5 * mag + 1e-30).all()


def test_gemv_xhat_reads_are_conflict_free():
    """For each float4 i, the 8 k lanes read 8 consecutive float4 of the permuted x̂ (128 bytes), and the
    permutation is a bijection of each 256-k block."""
    perm = [(kk & ~255) + ((kk >> 2) & 7) * 32 + ((kk >> 5) & 7) * 4 for kk in range(0, 512, 4)]
    assert sorted(perm) == list(range(0, 512, 4))
    for i in range(8):
        assert [i * 32 + kl * 4 for kl in range(8)] == list(range(i * 32, i * 32 + 32, 4))
        assert [perm[(32 * kl + 4 * i) // 4] for kl in range(8)] == [i * 32 + kl * 4 for kl in range(8)]


def _prologue_mirror(x, smooth, lora_down, kslice: int, rows: int, want_xhat: bool, want_inv: bool):
    """prologue_kernel's data flow block by block (grid: K slices x 32-row tiles x 32-rank tiles): what each
    output receives and how often it is written. Returns (xhat, xsum, inv_smooth, lora_act, writes)."""
    m_all, k = x.shape
    r = lora_down.shape[1]
    xf, sm, ld = x.float().numpy(), smooth.float().numpy(), lora_down.float().numpy()
    xhat, xsum = np.full((m_all, k), np.nan, np.float32), np.full((m_all, k // 32), np.nan, np.float32)
    inv, lora_part = np.full(k, np.nan, np.float32), {}
    writes = {"xhat": np.zeros((m_all, k), int), "xsum": np.zeros((m_all, k // 32), int), "inv": np.zeros(k, int),
              "lora_act": np.zeros((m_all, r), int)}  # fmt: skip
    slices, row_tiles, rank_tiles = -(-k // kslice), max(1, -(-rows // 32)), max(1, -(-r // 32))
    for bx in range(slices):
        for by in range(row_tiles):
            for bz in range(rank_tiles):
                m0, r0, k_begin, k_end = by * 32, bz * 32, bx * kslice, min(k, bx * kslice + kslice)
                rc = min(32, r - r0)
                acc = np.zeros((32, 32))
                for k0 in range(k_begin, k_end, 128):
                    xs_s = np.zeros((32, 128), np.float32)
                    for tid in range(256):
                        seg, row0 = tid & 15, tid >> 4
                        kk = k0 + seg * 8
                        if want_inv and by == 0 and bz == 0 and row0 == 0 and kk < k_end:
                            inv[kk : kk + 8] = np.float32(1) / sm[kk : kk + 8]
                            writes["inv"][kk : kk + 8] += 1
                        for h in range(2):
                            row = row0 + h * 16
                            mm = m0 + row
                            if mm < rows and kk < k_end:
                                v = xf[mm, kk : kk + 8] / sm[kk : kk + 8]
                                xs_s[row, seg * 8 : seg * 8 + 8] = v
                                if want_xhat and bz == 0:
                                    xhat[mm, kk : kk + 8] = v
                                    writes["xhat"][mm, kk : kk + 8] += 1
                                    if seg & 3 == 0:  # lanes seg..seg+3 (xor 1, 2) hold the other 24
                                        xsum[mm, kk // 32] = (xf[mm, kk : kk + 32] / sm[kk : kk + 32]).sum()
                                        writes["xsum"][mm, kk // 32] += 1
                    if rc > 0:
                        ld_s = np.zeros((128, 32), np.float32)
                        n_k = min(128, k_end - k0)
                        ld_s[:n_k, :rc] = ld[k0 : k0 + n_k, r0 : r0 + rc]
                        acc += xs_s.astype(np.float64) @ ld_s
                if rc > 0:
                    lora_part[(bx, by, bz)] = acc
    lora_act = np.full((m_all, r), np.nan)
    for by in range(row_tiles):  # the last block of each (row tile, rank tile) adds the slices in order
        for bz in range(rank_tiles):
            if (0, by, bz) not in lora_part:
                continue
            total = sum(lora_part[(bx, by, bz)] for bx in range(slices))
            for i in range(32):
                for rr in range(min(32, r - bz * 32)):
                    if by * 32 + i < rows:
                        lora_act[by * 32 + i, bz * 32 + rr] = total[i, rr]
                        writes["lora_act"][by * 32 + i, bz * 32 + rr] += 1
    return xhat, xsum, inv, lora_act, writes


@pytest.mark.parametrize(
    ("m", "k", "r", "kslice", "gemv"),
    [(35, 640, 40, 256, False), (3, 320, 0, 128, True), (16, 192, 32, 512, True), (40, 128, 0, 128, False)],
)
def test_prologue_mirror_matches_reference(m, k, r, kslice, gemv):
    """The prologue's indexing (slices, partial chunks, row and rank tiles) writes x̂ (GEMV) bit for bit as
    x / smooth, its 32-k sums, 1 / smooth (GEMM) and x̂ lora_down, each exactly once."""
    x, _, _, _, smooth, lora_down, _, _ = _w4a16_args(m, 8, k, r, False, torch.bfloat16, seed=k)
    rows = m if gemv or r else 0
    xhat, xsum, inv, lora_act, writes = _prologue_mirror(x, smooth, lora_down, kslice, rows, gemv, not gemv)
    want_xhat = (x.float() / smooth.float()).numpy()
    if gemv:
        assert (writes["xhat"] == 1).all() and (writes["xsum"] == 1).all()
        np.testing.assert_array_equal(xhat, want_xhat)
        np.testing.assert_allclose(xsum, want_xhat.reshape(m, k // 32, 32).sum(-1), rtol=1e-5, atol=1e-5)
    else:
        assert (writes["xhat"] == 0).all() and (writes["inv"] == 1).all()
        np.testing.assert_array_equal(inv, np.float32(1) / smooth.float().numpy())
    assert (writes["lora_act"] == (1 if r else 0)).all()
    if r:
        xh = want_xhat.astype(np.float64)
        want, mag = xh @ lora_down.double().numpy(), np.abs(xh) @ np.abs(lora_down.double().numpy())
        assert (np.abs(lora_act - want) <= 1e-5 * mag + 1e-30).all()


# --------------------------------------------------------------------------------- plan and binding


def _plan(m, n, k, r, path=0, sms=132) -> dict:
    return native._C.cuda_w4a16_plan(m, n, k, r, path, sms)


PLAN_SIZES = [(0, 64, 64, 0), (1, 18432, 3072, 32), (1, 3072, 12288, 32), (7, 33, 64, 4), (16, 3072, 12288, 32),
              (17, 200, 192, 0), (256, 3072, 12288, 33), (4099, 3072, 3072, 32), (5, 0, 128, 8)]  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("sms", [1, 46, 132])
@pytest.mark.parametrize("path", [0, 1, 2])
@pytest.mark.parametrize(("m", "n", "k", "r"), PLAN_SIZES)
def test_plan_invariants(m, n, k, r, path, sms):
    """The kernels' assumptions hold for the plan they are given: slices cover K in whole steps, the GEMV's
    shared memory fits 48 KB, workspace regions are aligned, disjoint and inside the workspace."""
    if path == 1 and m > 16:
        with pytest.raises(ValueError, match="at most 16 rows"):
            _plan(m, n, k, r, path, sms)
        return
    p = _plan(m, n, k, r, path, sms)
    assert p["kernel"] == ("gemv" if path == 1 or (path == 0 and m <= 16) else "gemm")
    if m == 0 or n == 0:
        assert p["bytes"] == 0
        return
    regions = {"lora_act_off": m * r if r else 0, "inv_smooth_off": k if p["kernel"] == "gemm" else 0}
    if p["kernel"] == "gemv":
        rows, kslice, ksplit = p["gemv_rows"], p["gemv_kslice"], p["gemv_ksplit"]
        assert rows >= m and rows in (1, 2, 4, 8, 16) and rows < 2 * m
        assert kslice % 256 == 0 and (ksplit - 1) * kslice < k <= ksplit * kslice
        assert rows * (kslice + kslice // 32) * 4 <= 48 * 1024
        regions |= {"xhat_off": m * k, "xsum_off": m * k // 32, "partial_off": ksplit * m * n if ksplit > 1 else 0}
        assert p["counters"] == p["pro_counters"] + (-(-n // 32) if ksplit > 1 else 0)
    else:
        assert p["gemm_bm"] in (64, 128)
    assert p["pro_rows"] == (m if p["kernel"] == "gemv" or r else 0)
    assert (
        p["pro_kslice"] % 128 == 0
        and (p["pro_kslices"] - 1) * p["pro_kslice"] < k <= p["pro_kslices"] * p["pro_kslice"]
    )
    if r and p["pro_kslices"] > 1:
        regions["lora_part_off"] = p["pro_kslices"] * m * r
        assert p["pro_counters"] == -(-max(m, 1) // 32) * -(-r // 32)
    for key, size in regions.items():
        assert (p[key] >= 0) == (size > 0), key
    spans = sorted((p[key], p[key] + 4 * size) for key, size in regions.items() if size)
    assert all(start % 16 == 0 for start, _ in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[0][0] >= 4 * p["counters"] and spans[-1][1] <= p["bytes"]


@needs_kernels
def test_plan_rejects_bad_sizes():
    for args, match in [((1, 8, 96, 0, 0, 132), "K must be a positive multiple of 64"),
                        ((1, 8, 0, 0, 0, 132), "K must be a positive multiple of 64"),
                        ((1, 8, 64, 0, 3, 132), "path must be 0"), ((1, 8, 64, 0, 0, 0), "sms must be"),
                        ((-1, 8, 64, 0, 0, 132), "M must be >= 0"),
                        ((16, 8, 64 << 20, 0, 0, 132), "too long for the GEMV")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            native._C.cuda_w4a16_plan(*args)


def _binding_args(**over):
    """cuda_linear_w4a16 arguments for M=2, N=8, K=64, R=4 with made-up aligned addresses (never dereferenced:
    every call below fails its checks first)."""
    a = dict(x=16, qweight=32, wscales=48, wmins=64, smooth=80, lora_down=96, lora_up=112, bias=0, y=128,
             workspace=160, workspace_bytes=1 << 20, M=2, N=8, K=64, R=4, dtype=1, path=0, sms=132, device=0,
             stream=0)  # fmt: skip
    a.update(over)
    return a


@needs_kernels
@pytest.mark.parametrize(
    ("over", "match"),
    [({"dtype": 0}, r"dtype must be 1 \(bfloat16\) or 2 \(float16\)"), ({"K": 96}, "positive multiple of 64"),
     ({"x": 8}, "x must be 16-byte aligned"), ({"workspace": 168}, "workspace must be 16-byte aligned"),
     ({"smooth": 84}, "smooth must be 16-byte aligned"),
     ({"qweight": 0}, "qweight is a null pointer"), ({"workspace_bytes": 0}, "workspace has 0 bytes"),
     ({"path": 3}, "path must be"), ({"x": -16}, "non-negative address"), ({"device": -1}, "device must be"),
     ({"path": 1, "M": 17}, "at most 16 rows"), ({"N": -1}, "N must be >= 0")],
)  # fmt: skip
def test_binding_checks_arguments_before_any_cuda_call(over, match):
    with pytest.raises(ValueError, match=match):
        native._C.cuda_linear_w4a16(**_binding_args(**over))


@needs_kernels
def test_binding_without_gpu_raises_runtime_error():
    """Valid arguments but no visible GPU: a RuntimeError naming the CUDA problem, not a crash."""
    code = (
        "import diffusers_svdquant.ops.native as n\n"
        f"try:\n    n._C.cuda_linear_w4a16(**{_binding_args()!r})\n"
        "except RuntimeError as e:\n    print('error', e)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "error linear_w4a16 (CUDA): cannot use CUDA device 0: cuda" in out.stdout, out.stdout


# --------------------------------------------------------- the Python wrapper with fake entry points


class _FakeNative:
    """Stands in for _C: records cuda_linear_w4a16's arguments and a copy of what x points to."""

    def __init__(self):
        self.calls: list[dict] = []

    def has_cuda(self):
        return True

    def cuda_w4a16_plan(self, m, n, k, r, path, sms):
        return {"bytes": 1000 + m}

    def cuda_linear_w4a16(self, *args):
        names = ["x", "qweight", "wscales", "wmins", "smooth", "lora_down", "lora_up", "bias", "y", "workspace",
                 "workspace_bytes", "M", "N", "K", "R", "dtype", "path", "sms", "device", "stream"]  # fmt: skip
        call = dict(zip(names, args, strict=True))
        n = call["M"] * call["K"]
        call["x_values"] = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(call["x"])).copy()
        self.calls.append(call)


@pytest.fixture
def fake_native(monkeypatch):
    fake = _FakeNative()
    monkeypatch.setattr(native, "_C", fake)
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setattr(cuda_w4a16, "_cuda_ready", lambda op, device: True)
    monkeypatch.setattr(cuda_w4a16, "_device_index", lambda device: 3)
    monkeypatch.setattr(cuda_w4a16, "_sm_count", lambda index: 132)
    monkeypatch.setattr(cuda_w4a16, "_stream", lambda device: 1234)
    monkeypatch.setattr(
        cuda_w4a16,
        "_workspace_bytes",
        lambda m, n, k, r, path, sms: fake.cuda_w4a16_plan(m, n, k, r, path, sms)["bytes"],
    )
    yield fake
    ops.set_cuda_w4a16_path("auto")


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wrapper_passes_contiguous_aligned_inputs(fake_native, dtype, has_bias):
    x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias = _w4a16_args(5, 24, 128, 3, has_bias, dtype)
    xt = torch.empty(128, 5, dtype=dtype).t()  # non-contiguous x
    xt.copy_(x)
    y = cuda_w4a16.linear_w4a16_cuda(xt, qweight, wscales, wmins, smooth, lora_down, lora_up, bias)
    assert y.shape == (5, 24) and y.dtype == dtype
    (call,) = fake_native.calls
    assert (call["M"], call["N"], call["K"], call["R"]) == (5, 24, 128, 3)
    assert call["dtype"] == native.DTYPE_CODES[dtype] and call["path"] == 0 and call["sms"] == 132
    assert call["device"] == 3 and call["stream"] == 1234 and call["workspace_bytes"] == 1005
    assert all(call[name] % 16 == 0 for name in ("x", "qweight", "smooth", "workspace"))
    assert (call["bias"] == 0) == (bias is None)
    np.testing.assert_array_equal(call["x_values"], _bits(x).reshape(-1))
    assert call["y"] == y.data_ptr()


@pytest.mark.parametrize(("name", "m", "code"), [("gemv", 16, 1), ("gemv", 17, 0), ("gemm", 1, 2), ("auto", 3, 0)])
def test_wrapper_forced_path(fake_native, name, m, code):
    """A forced GEMV takes at most 16 rows: above that the call runs the automatic choice (the GEMM)."""
    ops.set_cuda_w4a16_path(name)
    assert ops.cuda_w4a16_path() == name
    cuda_w4a16.linear_w4a16_cuda(*_w4a16_args(m, 8, 64, 0, False, torch.bfloat16))
    assert fake_native.calls[-1]["path"] == code


def test_wrapper_reference_path_skips_the_kernels(fake_native):
    """SVDQ_CUDA_W4A16=reference: the op runs reference.linear_w4a16, no native call (the way around the
    kernels until they have run on a GPU)."""
    ops.set_cuda_w4a16_path("reference")
    assert ops.cuda_w4a16_path() == "reference"
    args = _w4a16_args(3, 8, 64, 2, True, torch.bfloat16)
    torch.testing.assert_close(cuda_w4a16.linear_w4a16_cuda(*args), reference.linear_w4a16(*args), rtol=0, atol=0)
    assert not fake_native.calls


def test_wrapper_rejects_unknown_path():
    with pytest.raises(ValueError, match="unknown W4A16 CUDA path 'fast'"):
        ops.set_cuda_w4a16_path("fast")


def test_wrapper_empty_outputs_skip_the_kernel(fake_native):
    y = cuda_w4a16.linear_w4a16_cuda(*_w4a16_args(0, 8, 64, 2, True, torch.bfloat16))
    assert y.shape == (0, 8) and not fake_native.calls


@pytest.mark.parametrize("case", ["float32", "mixed"])
def test_wrapper_falls_back_to_reference(fake_native, case):
    """float32 x, or float tensors in another dtype than x: reference.linear_w4a16, said once."""
    args = list(_w4a16_args(3, 16, 128, 2, True, torch.float32 if case == "float32" else torch.bfloat16))
    if case == "mixed":
        args[2] = args[2].float()
    with pytest.warns(RuntimeWarning, match="using reference.py"):
        y = cuda_w4a16.linear_w4a16_cuda(*args)
    torch.testing.assert_close(y, reference.linear_w4a16(*args), rtol=0, atol=0)
    assert not fake_native.calls


def test_wrapper_unusable_device_uses_reference(fake_native, monkeypatch):
    monkeypatch.setattr(cuda_w4a16, "_cuda_ready", lambda op, device: False)
    args = _w4a16_args(2, 8, 64, 0, False, torch.bfloat16)
    torch.testing.assert_close(cuda_w4a16.linear_w4a16_cuda(*args), reference.linear_w4a16(*args), rtol=0, atol=0)
    assert not fake_native.calls


def test_wrapper_checks_arguments(fake_native):
    x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias = _w4a16_args(2, 8, 128, 2, True, torch.bfloat16)
    with pytest.raises(ValueError, match=r"wmins has shape \(8, 1\)"):
        cuda_w4a16.linear_w4a16_cuda(x, qweight, wscales, wmins[:, :1], smooth, lora_down, lora_up, bias)
    with pytest.raises(ValueError, match="bias is on meta"):
        cuda_w4a16.linear_w4a16_cuda(x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias.to("meta"))
    assert not fake_native.calls


# ------------------------------------------------------------------------------ GPU (marked cuda)


def _assert_w4a16_close(y, args, kernel: str):
    x, qweight, wscales, wmins, smooth, lora_down, lora_up, bias = (
        None if t is None else t.cuda() for t in args
    )  # fmt: skip
    dtype = x.dtype
    xs = x.double() / smooth.double()
    w = reference.dequantize_groups_affine(reference.unpack_uint4(qweight), wscales, wmins).double()
    want = xs @ w.t() + (xs @ lora_down.double()) @ lora_up.double().t()
    main = xs.abs() @ w.abs().t()
    mag = main + (xs.abs() @ lora_down.double().abs()) @ lora_up.double().abs().t()
    if bias is not None:
        want, mag = want + bias.double(), mag + bias.double().abs()
    u_w = U_W[dtype] if kernel == "gemm" else 0.0
    tol = 1e-5 * mag + u_w * main + U_OUT[dtype] * want.abs() + 2.0**-24 + 1e-30
    err = (y.double() - want).abs()
    assert y.dtype == dtype and y.shape == want.shape and y.is_cuda
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside tolerance; worst {float((err / tol).max()):.3g}x"


def _kernel_for(m, n, k, r) -> str:
    index = torch.cuda.current_device()
    return _plan(max(m, 1), n, k, r, 0, torch.cuda.get_device_properties(index).multi_processor_count)["kernel"]


@pytest.mark.cuda
@needs_gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [0, 1, 7, 16, 17, 256])
@pytest.mark.parametrize(("k", "n", "r", "has_bias"), [(3072, 3072, 32, True), (64, 200, 0, False),
                                                       (192, 1000, 32, True), (12288, 3072, 32, False),
                                                       (3072, 129, 0, True), (640, 33, 32, True)])  # fmt: skip
def test_linear_w4a16_cuda_matches_reference(m, k, n, r, has_bias, dtype):
    """The op on CUDA tensors (GEMV up to 16 rows, GEMM above; split-K on the long-K shapes) vs the reference."""
    args = _w4a16_args(m, n, k, r, has_bias, dtype, seed=m + k + n)
    y = torch.ops.svdquant.linear_w4a16(*(None if t is None else t.cuda() for t in args))
    _assert_w4a16_close(y, args, _kernel_for(m, n, k, r))


@pytest.mark.cuda
@needs_gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("path", "m"), [("gemm", 1), ("gemm", 7), ("gemm", 16), ("gemv", 1), ("gemv", 2),
                                         ("gemv", 5), ("gemv", 16), ("gemm", 1024)])  # fmt: skip
def test_linear_w4a16_cuda_forced_kernels(path, m, dtype):
    """Both kernels on the same sizes (the GEMM's 64- and 128-row tiles; every GEMV row count)."""
    n, k = (4096, 1024) if m == 1024 else (1000, 3072)
    args = _w4a16_args(m, n, k, 32, True, dtype, seed=m)
    ops.set_cuda_w4a16_path(path)
    try:
        y = torch.ops.svdquant.linear_w4a16(*(t.cuda() for t in args))
    finally:
        ops.set_cuda_w4a16_path("auto")
    _assert_w4a16_close(y, args, path)


@pytest.mark.cuda
@needs_gpu
@needs_kernels
@pytest.mark.parametrize("m", [1, 40])
def test_linear_w4a16_cuda_non_contiguous_inputs(m):
    args = [None if t is None else t.cuda() for t in _w4a16_args(m, 300, 640, 32, True, torch.bfloat16, seed=9)]
    x = torch.empty(640, m, dtype=torch.bfloat16, device="cuda").t()
    x.copy_(args[0])
    wscales = args[2].t().contiguous().t()
    y = torch.ops.svdquant.linear_w4a16(x, args[1], wscales, *args[3:])
    _assert_w4a16_close(y, [t.cpu() if t is not None else None for t in args], _kernel_for(m, 300, 640, 32))


@pytest.mark.cuda
@needs_gpu
@needs_kernels
def test_linear_w4a16_cuda_float32_and_errors():
    """float32 x runs the reference on the GPU; a tensor on another device is a ValueError naming it."""
    args = [None if t is None else t.cuda() for t in _w4a16_args(3, 64, 128, 2, True, torch.float32)]
    torch.testing.assert_close(torch.ops.svdquant.linear_w4a16(*args), reference.linear_w4a16(*args))
    args = [None if t is None else t.cuda() for t in _w4a16_args(3, 64, 128, 2, True, torch.bfloat16)]
    with pytest.raises(ValueError, match="smooth is on cpu"):
        torch.ops.svdquant.linear_w4a16(args[0], args[1], args[2], args[3], args[4].cpu(), *args[5:])


@pytest.mark.cuda
@needs_gpu
@needs_kernels
@pytest.mark.parametrize(("m", "r", "has_bias"), [(0, 4, True), (1, 0, False), (17, 4, True)])
def test_opcheck_linear_w4a16_cuda(m, r, has_bias):
    args = tuple(None if t is None else t.cuda() for t in _w4a16_args(m, 200, 128, r, has_bias, torch.bfloat16))
    torch.library.opcheck(torch.ops.svdquant.linear_w4a16, args)
