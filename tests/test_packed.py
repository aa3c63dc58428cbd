"""calibration/packed.py: the packed upper triangle that XᵀX sums are held in."""

from __future__ import annotations

import pytest
import torch

from diffusers_svdquant.calibration.packed import pack_blocks, pack_moment, packed_size, packed_width, unpack_moment


@pytest.mark.parametrize("k", [0, 1, 64, 255, 256, 257, 300, 512, 3072, 12288])
def test_sizes_and_widths(k):
    blocks = pack_blocks(torch.empty(packed_size(k)), k)
    assert sum(v.numel() for _, _, v in blocks) == packed_size(k)
    assert [r0 for r0, _, _ in blocks] == list(range(0, k, 256)) and (not blocks or blocks[-1][1] == k)
    assert k * (k + 1) // 2 <= packed_size(k) <= k * (k + 1) // 2 + 128 * k
    if k:
        assert packed_width(packed_size(k)) == k
        with pytest.raises(ValueError, match="no packed XᵀX"):
            packed_width(packed_size(k) + 1)


@pytest.mark.parametrize("k", [5, 256, 300, 700])
def test_unpack_gives_the_symmetric_matrix_of_the_upper_triangle(k):
    torch.manual_seed(k)
    full = torch.randn(k, k)
    packed = torch.cat([full[r0:r1, r0:].reshape(-1) for r0, r1, _ in pack_blocks(torch.empty(packed_size(k)), k)])
    out = unpack_moment(packed)
    upper = torch.triu(full)
    assert torch.equal(out, upper + torch.triu(full, 1).t())  # the lower triangle of `full` is never read
    assert torch.equal(out, out.t())


@pytest.mark.parametrize("k", [1, 64, 255, 256, 257, 700])
def test_pack_moment_is_what_unpack_reads_back_bit_for_bit(k):
    """What the calibration file stores (version 4): the packed triangle of the unpacked matrix, which unpacks to the
    very same bits (the diagonal blocks' lower wedges, computed but never read, may differ)."""
    g = torch.Generator().manual_seed(k)
    packed = torch.randn(packed_size(k), generator=g)
    full = unpack_moment(packed)
    again = pack_moment(full)
    assert again.shape == (packed_size(k),) and again.dtype == torch.float32
    assert torch.equal(unpack_moment(again), full)
    with pytest.raises(ValueError, match=r"must be square \[K, K\], got \[3, 4\]"):
        pack_moment(torch.zeros(3, 4))
