"""Real layer shapes of popular diffusion models, built locally with random weights.

Demos and benchmarks need FLUX-sized layers without downloading FLUX: these builders use the
published configs (layer sizes, heads, embedding widths) with fewer blocks. Inputs for them come
from :mod:`diffusers_svdquant.denoisers`.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

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


def flux_shaped(
    num_layers: int = 1, num_single_layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel with FLUX.1's layer sizes and ``num_layers`` + ``num_single_layers`` blocks.

    Built directly in ``dtype``: casting afterwards with ``.to(dtype)`` makes diffusers warn about
    modules to keep in float32 (a list that is empty for FLUX).
    """
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return FluxTransformer2DModel(
            **{**FLUX1_CONFIG, "num_layers": num_layers, "num_single_layers": num_single_layers}
        )
    finally:
        torch.set_default_dtype(default)


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
