"""Quality report: the 16-bit pipeline against quantized ones, same prompts and seeds.

For each method (naive W4A4 RTN, SmoothQuant-style W4A4, SVDQuant without and with calibration, and
SVDQuant with the AdaLN linears 16-bit or W4A4 instead of weight-only)
the denoiser is quantized on load from the same checkpoint, swapped into the pipeline, and the
same prompts are generated with the same seeds. Images are compared by PSNR and SSIM
(scikit-image), final latents by PSNR over the reference's range and relative error, every
quantized layer by its relative output error on the calibration rows, and every transformer block by
its relative output error on the inputs the 16-bit block received while generating the (held-out)
evaluation prompts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration import CalibrationStats
from ..config import DEFAULT_MODULES_TO_NOT_CONVERT, DEFAULT_WEIGHT_ONLY_MODULES, SVDQuantConfig
from ..linear import SVDQuantLinear
from ..metrics import psnr, rel_error, ssim


def method_configs(rank: int, stats: CalibrationStats | None) -> dict[str, SVDQuantConfig]:
    """The methods the report puts side by side (SmoothQuant and calibrated SVDQuant need ``stats``).

    * ``naive-w4a4``: INT4 round-to-nearest weights and activations, group 64, no smoothing, no branch (and
      ``scale_search=False``: weight scales ``absmax / 7``);
    * ``smoothquant-w4a4``: the same with SmoothQuant smoothing (α = 0.5) from the statistics;
    * ``svdquant``: rank-``rank`` branch, no statistics (λ = 1), the default scale search and refinement;
    * ``svdquant-calibrated``: rank-``rank`` branch with the searched per-layer (α, β);
    * ``svdquant-calibrated-gptq``: the same with the residual rounded by GPTQ (statistics with ``XᵀX``);
    * ``svdquant-adaln-16bit`` / ``svdquant-adaln-w4a4``: ``svdquant-calibrated`` (``svdquant`` without
      ``stats``) with the AdaLN modulation linears kept 16-bit / quantized W4A4 instead of the default
      weight-only W4A16, so the default's choice is shown against both alternatives.

    Every method quantizes the same layers, the AdaLN linears weight-only unless named otherwise.
    """
    rtn = {"rank": 0, "scale_search": False}
    methods = {"naive-w4a4": SVDQuantConfig(**rtn)}
    if stats is not None:
        methods["smoothquant-w4a4"] = SVDQuantConfig(**rtn, calibration=stats, smoothing_alpha=0.5)
    methods["svdquant"] = SVDQuantConfig(rank=rank)
    if stats is not None:
        methods["svdquant-calibrated"] = SVDQuantConfig(rank=rank, calibration=stats, gptq=False)
    if stats is not None and stats.has_hessian:
        methods["svdquant-calibrated-gptq"] = SVDQuantConfig(rank=rank, calibration=stats, gptq=True)
    base = {"rank": rank, "calibration": stats, "gptq": False}
    keep_adaln = [*DEFAULT_MODULES_TO_NOT_CONVERT, *DEFAULT_WEIGHT_ONLY_MODULES]
    methods["svdquant-adaln-16bit"] = SVDQuantConfig(**base, modules_to_not_convert=keep_adaln, weight_only_modules=[])
    methods["svdquant-adaln-w4a4"] = SVDQuantConfig(**base, weight_only_modules=[])
    return methods


def layer_errors(model: nn.Module, reference: nn.Module, stats: CalibrationStats) -> dict[str, float]:
    """Relative output error of each quantized layer of ``model`` against the same layer of the
    16-bit ``reference`` on the calibration rows in ``stats.samples``."""
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            rows = stats.samples.get(name)
            if not isinstance(module, SVDQuantLinear) or rows is None or rows.shape[0] == 0:
                continue
            lin = reference.get_submodule(name)
            x = rows.to(lin.weight.device, lin.weight.dtype)
            out[name] = rel_error(module(x.to(module.wscales.dtype)).float(), lin(x).float())
    return out


def block_errors(model: nn.Module, reference: nn.Module, inputs: dict[str, list]) -> dict[str, float]:
    """Relative output error of each transformer block of ``model`` against the same 16-bit block of ``reference``
    on the block inputs the 16-bit model saw (:func:`~diffusers_svdquant.calibration.blocks.record_block_inputs`
    on the evaluation prompts): the layers' errors as they add up inside a block."""
    from ..calibration.blocks import block_error

    return {name: block_error(reference.get_submodule(name), model.get_submodule(name), calls)
            for name, calls in inputs.items()}  # fmt: skip


@dataclass
class MethodReport:
    """One method's figures against the 16-bit pipeline (means over prompts)."""

    name: str
    image_psnr: float
    image_ssim: float
    latent_psnr: float
    latent_rel_error: float
    layer_errors: dict[str, float] = field(default_factory=dict)
    block_errors: dict[str, float] = field(default_factory=dict)

    @property
    def mean_layer_error(self) -> float:
        """Mean of :attr:`layer_errors` (NaN without any)."""
        v = list(self.layer_errors.values())
        return sum(v) / len(v) if v else math.nan

    @property
    def mean_block_error(self) -> float:
        """Mean of :attr:`block_errors` (NaN without any)."""
        v = list(self.block_errors.values())
        return sum(v) / len(v) if v else math.nan


def _keep_last_latents(pipe: Any, last: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The call arguments that store each step's latents in ``last["latents"]``."""

    def store(latents: torch.Tensor) -> None:
        last["latents"] = latents.detach().float().cpu()

    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:

        def on_step_end(_pipe: Any, _step: int, _t: Any, cb: dict) -> dict:
            store(cb["latents"])
            return cb

        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
    # PixArt-α / Σ take only the older per-step callback(step, timestep, latents) (and swallow unknown arguments).
    return {"callback": lambda _step, _t, latents: store(latents), "callback_steps": 1}


def generate(pipe: Any, prompts: Sequence[str], seed: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[P, 3, H, W]`` (a video pipeline's frames: ``[P, F, 3, H, W]``) in ``[0, 1]`` and final latents
    ``[P, ...]`` (float32) of ``prompts``, prompt ``i`` with ``generator = manual_seed(seed + i)``."""
    images, latents = [], []
    for i, prompt in enumerate(prompts):
        last: dict[str, torch.Tensor] = {}
        out = pipe(
            prompt=prompt,
            generator=torch.Generator().manual_seed(seed + i),
            output_type="pt",
            **_keep_last_latents(pipe, last),
            **kwargs,
        )
        # Video pipelines (Wan, HunyuanVideo, LTX) return their output as .frames.
        images.append((out.frames if hasattr(out, "frames") else out.images).float().cpu())
        latents.append(last["latents"])
    return torch.cat(images), torch.cat(latents)


def compare(
    name: str, images: torch.Tensor, latents: torch.Tensor, ref_images: torch.Tensor, ref_latents: torch.Tensor
) -> MethodReport:
    """Per-prompt PSNR / SSIM of images and PSNR / relative error of latents, averaged."""
    n = len(ref_images)
    return MethodReport(
        name,
        image_psnr=sum(psnr(images[i], ref_images[i], 1.0) for i in range(n)) / n,
        image_ssim=sum(ssim(images[i], ref_images[i]) for i in range(n)) / n,
        latent_psnr=sum(psnr(latents[i], ref_latents[i]) for i in range(n)) / n,
        latent_rel_error=sum(rel_error(latents[i], ref_latents[i]) for i in range(n)) / n,
    )


def format_report(reports: Sequence[MethodReport], worst: int = 5) -> str:
    """A plain-text table of the methods, then each method's worst layers."""
    lines = [
        f"{'method':<22}{'image PSNR':>12}{'image SSIM':>12}{'latent PSNR':>13}{'latent rel':>12}{'layer err':>11}"
        f"{'block err':>11}",
    ]
    for r in reports:
        lines.append(
            f"{r.name:<22}{r.image_psnr:>9.2f} dB{r.image_ssim:>12.4f}{r.latent_psnr:>10.2f} dB"
            f"{r.latent_rel_error:>12.4f}{r.mean_layer_error:>11.4f}{r.mean_block_error:>11.4f}"
        )
    for r in reports:
        if r.layer_errors:
            top = sorted(r.layer_errors.items(), key=lambda kv: -kv[1])[:worst]
            lines.append(f"{r.name}: worst layers " + ", ".join(f"{k} {v:.4f}" for k, v in top))
    return "\n".join(lines)
