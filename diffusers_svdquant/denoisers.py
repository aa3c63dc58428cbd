"""One call of a diffusers denoiser (Flux, SD3, UNet2DCondition) on seeded random inputs.

What the demo, the benchmarks and the hub's model card need to run a denoiser without a pipeline:
inputs of the right shapes for the model class, the timestep convention, and the quality of one
call of a quantized model against its 16-bit original.
"""

from __future__ import annotations

import math

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from .metrics import cosine, psnr, rel_error


def model_inputs(model: torch.nn.Module, image_tokens: int = 256, text_tokens: int = 64, seed: int = 0) -> dict:
    """Random inputs for one denoiser call, batch 1, in the model's dtype.

    Flux: ``image_tokens`` packed latent tokens (256 = a 256x256 image) and ``text_tokens`` T5 tokens.
    SD3 / UNet: a square latent with about ``image_tokens`` patches and ``text_tokens`` text tokens.
    The result has no ``timestep``: the caller sets it per step.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cfg = model.config

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if isinstance(model, FluxTransformer2DModel):
        side = int(image_tokens**0.5)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).to(dtype)
        inputs = {
            "hidden_states": randn(1, side * side, cfg.in_channels),
            "encoder_hidden_states": randn(1, text_tokens, cfg.joint_attention_dim),
            "pooled_projections": randn(1, cfg.pooled_projection_dim),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(text_tokens, 3, dtype=dtype),
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.5], dtype=dtype)
        return inputs
    if isinstance(model, SD3Transformer2DModel):
        side = int(image_tokens**0.5) * cfg.patch_size
        return {
            "hidden_states": randn(1, cfg.in_channels, side, side),
            "encoder_hidden_states": randn(1, text_tokens, cfg.joint_attention_dim),
            "pooled_projections": randn(1, cfg.pooled_projection_dim),
        }
    if isinstance(model, UNet2DConditionModel):
        side = max(8, int(image_tokens**0.5))
        cross = cfg.cross_attention_dim
        inputs = {
            "sample": randn(1, cfg.in_channels, side, side),
            "encoder_hidden_states": randn(1, text_tokens, cross if isinstance(cross, int) else cross[0]),
        }
        if cfg.addition_embed_type == "text_time":  # SDXL
            inputs["added_cond_kwargs"] = {
                "text_embeds": randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim),
                "time_ids": randn(1, 6),
            }
        return inputs
    raise ValueError(
        f"no input recipe for {type(model).__name__}; supported: FluxTransformer2DModel, "
        f"SD3Transformer2DModel, UNet2DConditionModel"
    )


def timestep_value(model: torch.nn.Module, t: float) -> torch.Tensor:
    """Timestep tensor for ``t`` in [0, 1] in the convention of the model class (Flux takes t/1000)."""
    dtype = next(model.parameters()).dtype
    if isinstance(model, FluxTransformer2DModel):
        return torch.tensor([t], dtype=dtype)
    return torch.tensor([t * 1000.0], dtype=dtype)


def denoiser_quality(
    model16: torch.nn.Module, modelq: torch.nn.Module, image_tokens: int = 64, text_tokens: int = 16
) -> dict[str, float | str]:
    """One call of both models on the same seeded inputs: relative error, cosine and PSNR of the quantized
    output against the 16-bit one (``"inf"`` for identical outputs, so the dict stays JSON-safe)."""
    outs = []
    for model in (model16, modelq):
        inputs = model_inputs(model, image_tokens, text_tokens)
        with torch.no_grad():
            outs.append(model(**inputs, timestep=timestep_value(model, 0.5), return_dict=False)[0].float())
    ref, out = outs
    p = psnr(out, ref)
    return {
        "relative error vs 16-bit (one denoiser call)": rel_error(out, ref),
        "cosine vs 16-bit": cosine(out, ref),
        "PSNR vs 16-bit (dB)": p if math.isfinite(p) else "inf",
    }
