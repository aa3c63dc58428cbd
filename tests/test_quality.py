"""The quality report's metrics: PSNR / SSIM through scikit-image, per-layer errors, the methods compared."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusers_svdquant import CalibrationStats, SVDQuantLinear, quality

pytest.importorskip("skimage")


def _image(seed: int, shape=(3, 32, 32)) -> torch.Tensor:
    """A smooth image in [0, 1] (a real photo downscaled when scikit-image ships one)."""
    from skimage import data, transform

    img = torch.from_numpy(transform.resize(data.astronaut(), shape[1:], anti_aliasing=True)).permute(2, 0, 1)
    return img.float().clamp(0, 1) if seed == 0 else img.roll(seed, dims=-1).float().clamp(0, 1)


def test_psnr_matches_its_definition():
    ref = _image(0)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    test = ref + noise
    want = 10 * math.log10(1.0 / noise.double().pow(2).mean().item())
    assert quality.psnr(test, ref, 1.0) == pytest.approx(want, rel=1e-6)
    assert quality.psnr(ref, ref) == math.inf


def test_ssim_orders_distortions():
    """SSIM is 1 for identical images and falls with more noise (on a real photo)."""
    ref = _image(0)
    g = torch.Generator().manual_seed(1)
    mild = (ref + 0.02 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    strong = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    assert quality.ssim(ref, ref) == pytest.approx(1.0)
    assert 1.0 > quality.ssim(mild, ref) > quality.ssim(strong, ref) > 0
    tiny = _image(0, (3, 4, 4))  # smaller than SSIM's default 7x7 window
    assert quality.ssim(tiny, tiny) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        quality.ssim(ref, _image(0, (3, 16, 16)))


def test_layer_errors_equal_a_direct_computation():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(128, 64))
    q = nn.Sequential(SVDQuantLinear.from_linear(ref[0], 8))
    rows = torch.randn(16, 128)
    stats = CalibrationStats(samples={"0": rows})
    errs = quality.layer_errors(q, ref, stats)
    with torch.no_grad():
        want = ((q[0](rows) - ref[0](rows)).norm() / ref[0](rows).norm()).item()
    assert errs == {"0": pytest.approx(want, rel=1e-5)}
    assert 0 < want < 0.5


def test_methods_side_by_side():
    stats = CalibrationStats(act_absmax={"a": torch.ones(64)})
    methods = quality.method_configs(32, stats)
    assert list(methods) == ["naive-w4a4", "smoothquant-w4a4", "svdquant", "svdquant-calibrated"]
    assert methods["naive-w4a4"].rank == 0 and methods["naive-w4a4"].calibration is None
    assert methods["smoothquant-w4a4"].rank == 0 and methods["smoothquant-w4a4"].smoothing_alpha == 0.5
    assert methods["svdquant"].calibration is None and methods["svdquant-calibrated"].calibration is stats
    assert list(quality.method_configs(32, None)) == ["naive-w4a4", "svdquant"]


def test_format_report_lists_worst_layers():
    r = quality.MethodReport("svdquant", 30.0, 0.9, 40.0, 0.01, {"a": 0.1, "b": 0.3, "c": 0.2})
    text = quality.format_report([r], worst=2)
    assert "svdquant" in text and "b 0.3000, c 0.2000" in text and "a 0.1000" not in text
    assert r.mean_layer_error == pytest.approx(0.2)
