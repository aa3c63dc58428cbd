"""How far a quantized model's output is from the 16-bit one: the one home of the metrics.

Every figure the demo, the hub's model card and the quality report print comes from here, so
"PSNR" means the same thing everywhere. All take tensors of equal shape and return a float.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rel_error(test: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖test − ref‖ / ‖ref‖`` in float64 (0 for two zero tensors)."""
    return float((test.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def cosine(test: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the two tensors flattened, in float64."""
    return float(torch.nn.functional.cosine_similarity(test.double().flatten(), ref.double().flatten(), dim=0))


def psnr(test: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """PSNR in dB of ``test`` against ``ref``: ``10·log10(range² / MSE)`` in float64, ``inf`` when equal.

    ``data_range`` defaults to the reference's peak-to-peak range (1.0 if it is constant); pass
    1.0 for images in ``[0, 1]``.
    """
    ref64, test64 = ref.double(), test.double()
    if data_range is None:
        data_range = float(ref64.max() - ref64.min()) or 1.0
    mse = float(torch.mean((test64 - ref64) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _skimage_metrics() -> Any:
    try:
        from skimage import metrics
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("SSIM needs scikit-image: pip install 'diffusers-svdquant[eval]'") from e
    return metrics


def ssim(test: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM (scikit-image) of images ``[B, C, H, W]`` (or ``[C, H, W]``) with values in ``[0, 1]``."""
    metrics = _skimage_metrics()
    ref4, test4 = ref.reshape(-1, *ref.shape[-3:]), test.reshape(-1, *test.shape[-3:])
    if ref4.shape != test4.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(test.shape)} vs {tuple(ref.shape)}")
    scores = []
    for a, b in zip(test4, ref4, strict=True):
        a_np = a.double().permute(1, 2, 0).cpu().numpy()
        b_np = b.double().permute(1, 2, 0).cpu().numpy()
        # Small generated images: the 7x7 default window must fit (and be odd).
        side = min(b_np.shape[:2])
        win = 7 if side >= 7 else side - (side + 1) % 2
        scores.append(metrics.structural_similarity(a_np, b_np, data_range=1.0, channel_axis=2, win_size=win))
    return float(sum(scores) / len(scores))
