"""The metrics every report uses: PSNR, SSIM (scikit-image, on a real photo), relative error, cosine."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_svdquant import metrics


def _image(seed: int, shape=(3, 32, 32)) -> torch.Tensor:
    """A smooth image in [0, 1] (a real photo downscaled when scikit-image ships one)."""
    pytest.importorskip("skimage")
    from skimage import data, transform

    img = torch.from_numpy(transform.resize(data.astronaut(), shape[1:], anti_aliasing=True)).permute(2, 0, 1)
    return img.float().clamp(0, 1) if seed == 0 else img.roll(seed, dims=-1).float().clamp(0, 1)


def test_psnr_matches_its_definition():
    ref = _image(0)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    test = ref + noise
    want = 10 * math.log10(1.0 / noise.double().pow(2).mean().item())
    assert metrics.psnr(test, ref, 1.0) == pytest.approx(want, rel=1e-6)
    assert metrics.psnr(ref, ref) == math.inf


def test_ssim_orders_distortions():
    """SSIM is 1 for identical images and falls with more noise (on a real photo)."""
    ref = _image(0)
    g = torch.Generator().manual_seed(1)
    mild = (ref + 0.02 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    strong = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)
    assert 1.0 > metrics.ssim(mild, ref) > metrics.ssim(strong, ref) > 0
    tiny = _image(0, (3, 4, 4))  # smaller than SSIM's default 7x7 window
    assert metrics.ssim(tiny, tiny) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(ref, _image(0, (3, 16, 16)))


def test_psnr_default_range_is_the_references_peak_to_peak():
    ref = torch.linspace(-2.0, 3.0, 100, dtype=torch.float64)
    test = ref + 0.05
    assert metrics.psnr(test, ref) == pytest.approx(10 * math.log10(5.0**2 / 0.05**2), rel=1e-9)
    assert metrics.psnr(torch.zeros(4) + 0.5, torch.zeros(4)) == pytest.approx(10 * math.log10(1 / 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rel_error_and_cosine_match_their_definitions(dtype):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 50, generator=g).to(dtype)
    test = (ref.double() + 0.1 * torch.randn(3, 50, generator=g, dtype=torch.float64)).to(dtype)
    r, t = ref.double(), test.double()
    assert metrics.rel_error(test, ref) == pytest.approx(((t - r).norm() / r.norm()).item(), rel=1e-12)
    assert metrics.cosine(test, ref) == pytest.approx((t.flatten() @ r.flatten() / (t.norm() * r.norm())).item())
    assert metrics.rel_error(ref, ref) == 0.0 and metrics.cosine(ref, ref) == pytest.approx(1.0)
    assert metrics.cosine(-ref, ref) == pytest.approx(-1.0)
