"""Tiny random-weight diffusers models (same layer kinds as FLUX / SD3 / SD-UNet) and their inputs.

Hidden sizes are multiples of 64 so the attention and feed-forward linears are quantizable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel


@dataclass
class TinyModel:
    """A model class, how to build one with random weights, and a batch of inputs for it."""

    name: str
    cls: type
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.dtype], dict]


def _flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24],
    )  # fmt: skip


def _flux_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 8, 128, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(1, 64, generator=g, dtype=dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "img_ids": torch.zeros(16, 3, dtype=dtype),
        "txt_ids": torch.zeros(8, 3, dtype=dtype),
    }


def _sd3() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16,
    )  # fmt: skip


def _sd3_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(2)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 8, 128, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(1, 64, generator=g, dtype=dtype),
        "timestep": torch.tensor([500], dtype=torch.long),
    }


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=64, norm_num_groups=32,
    )  # fmt: skip


def _unet_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g, dtype=dtype),
        "timestep": torch.tensor([500], dtype=torch.long),
        "encoder_hidden_states": torch.randn(1, 8, 128, generator=g, dtype=dtype),
    }


TINY_MODELS = {
    "flux": TinyModel("flux", FluxTransformer2DModel, _flux, _flux_inputs),
    "sd3": TinyModel("sd3", SD3Transformer2DModel, _sd3, _sd3_inputs),
    "unet": TinyModel("unet", UNet2DConditionModel, _unet, _unet_inputs),
}


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's main output tensor, without autograd."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
