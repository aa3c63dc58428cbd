"""Real layer shapes of popular diffusion models, built locally with random weights.

Demos and benchmarks need FLUX-sized layers without downloading FLUX: these builders use the
published configs (layer sizes, heads, embedding widths) with fewer blocks, and know how to make
a batch of inputs for each model class.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

# FLUX.1-dev / schnell transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json),
# 19 double + 38 single blocks in the real model.
FLUX1_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


def flux_shaped(num_layers: int = 1, num_single_layers: int = 2, seed: int = 0) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel with FLUX.1's layer sizes and ``num_layers`` + ``num_single_layers`` blocks."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**FLUX1_CONFIG, "num_layers": num_layers, "num_single_layers": num_single_layers})


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


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (what ``save_pretrained`` writes, roughly)."""
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
