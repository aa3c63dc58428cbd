"""One tiny random-weight model per diffusers denoiser family, built from the real diffusers class.

Every family a diffusers user would quantize gets a config small enough to build, quantize and run in a
fraction of a second on a CPU, yet with the layer kinds of the full model: its attention and feed-forward
linears are multiples of 64 wide (the INT4 group), so they are quantizable, and its embedders, modulation
and output layers are the ones the real checkpoint has. ``inputs(dtype)`` makes one seeded batch for a
single forward call in the layout the family's pipeline passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from models import TinyModel


@dataclass
class Family(TinyModel):
    """A :class:`TinyModel` plus the name of the diffusers pipeline that runs this denoiser."""

    pipeline: str


def _randn(g: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    # Drawn in float32 and cast, so the bf16 and float32 batches hold the same numbers.
    return torch.randn(*shape, generator=g).to(dtype)


def _flux_ids(side: int, text: int, axes: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE position ids of a ``side`` x ``side`` latent grid and of ``text`` text tokens, as FLUX pipelines
    make them: the image's row / column in the last two axes (distinct positions, so RoPE takes effect)."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img = torch.zeros(side * side, axes)
    img[:, -2], img[:, -1] = ys.reshape(-1).float(), xs.reshape(-1).float()
    return img.to(dtype), torch.zeros(text, axes, dtype=dtype)


# FLUX.1: 19 double + 38 single blocks of 3072 (24 heads of 128); here 1 + 1 of 128.
def _flux() -> torch.nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24],
        guidance_embeds=True,
    )  # fmt: skip


def _flux_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(11)
    img_ids, txt_ids = _flux_ids(4, 8, 3, dtype)
    return {
        "hidden_states": _randn(g, dtype, 1, 16, 64),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "pooled_projections": _randn(g, dtype, 1, 64),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([3.5], dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


# FLUX.2: shared modulation, SwiGLU feed-forwards, fused single-block qkv+mlp projection, 4 RoPE axes.
def _flux2() -> torch.nn.Module:
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=128, timestep_guidance_channels=64, mlp_ratio=3.0,
        axes_dims_rope=(16, 16, 16, 16), guidance_embeds=True,
    )  # fmt: skip


def _flux2_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(12)
    img_ids, txt_ids = _flux_ids(4, 8, 4, dtype)
    return {
        "hidden_states": _randn(g, dtype, 1, 16, 64),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([4.0], dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


# Chroma: FLUX.1-schnell blocks whose modulation comes from one small MLP (the "approximator").
def _chroma() -> torch.nn.Module:
    return diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=128, axes_dims_rope=(16, 24, 24), approximator_num_channels=64,
        approximator_hidden_dim=128, approximator_layers=1,
    )  # fmt: skip


def _chroma_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(13)
    img_ids, txt_ids = _flux_ids(4, 8, 3, dtype)
    return {
        "hidden_states": _randn(g, dtype, 1, 16, 64),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


# SD3 / SD3.5: MMDiT joint blocks; qk_norm as in SD3.5.
def _sd3() -> torch.nn.Module:
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm",
    )  # fmt: skip


def _sd3_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(14)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "pooled_projections": _randn(g, dtype, 1, 64),
        "timestep": torch.tensor([500.0], dtype=dtype),
    }


# SDXL: linear proj_in / proj_out in its transformers, and the "text_time" added conditioning
# (pooled text embeds + 6 size / crop numbers).
def _sdxl() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1), attention_head_dim=(1, 2), cross_attention_dim=128,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=32,
    )  # fmt: skip


def _sdxl_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(15)
    return {
        "sample": _randn(g, dtype, 1, 4, 8, 8),
        "timestep": torch.tensor([500.0], dtype=dtype),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "added_cond_kwargs": {
            "text_embeds": _randn(g, dtype, 1, 64),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]], dtype=dtype),
        },
    }


# SD1.5: conv proj_in / proj_out, cross-attention in every down / up block but the last.
def _sd15() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=1, norm_num_groups=32,
    )  # fmt: skip


def _sd15_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(16)
    return {
        "sample": _randn(g, dtype, 1, 4, 8, 8),
        "timestep": torch.tensor([500.0], dtype=dtype),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
    }


# Sana: linear attention, a conv GLU feed-forward (so only the attention linears are quantizable).
def _sana() -> torch.nn.Module:
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128, caption_channels=128,
        mlp_ratio=2.5, sample_size=8, patch_size=1,
    )  # fmt: skip


def _sana_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(17)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([500.0], dtype=dtype),
    }


# PixArt-Sigma: adaLN-single (one shared modulation), cross-attention to T5 features.
def _pixart() -> torch.nn.Module:
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=128, sample_size=8, patch_size=2, caption_channels=128, interpolation_scale=1,
        use_additional_conditions=False,
    )  # fmt: skip


def _pixart_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(18)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([500], dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


# Qwen-Image: MMDiT with per-stream modulation (img_mod / txt_mod) and 3-axis video-style RoPE.
def _qwen() -> torch.nn.Module:
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=128, axes_dims_rope=(16, 24, 24),
    )  # fmt: skip


def _qwen_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(19)
    return {
        "hidden_states": _randn(g, dtype, 1, 16, 64),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "img_shapes": [[(1, 4, 4)]],
    }


# Z-Image: single-stream DiT with noise / context refiner blocks; takes lists of per-image tensors.
def _zimage() -> torch.nn.Module:
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=192, n_layers=1, n_refiner_layers=1,
        n_heads=3, n_kv_heads=3, cap_feat_dim=128, axes_dims=[16, 24, 24], axes_lens=[64, 32, 32],
    )  # fmt: skip


def _zimage_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(20)
    return {
        "x": [_randn(g, dtype, 4, 1, 8, 8)],  # [C, F, H, W]
        "t": torch.tensor([0.5], dtype=dtype),
        "cap_feats": [_randn(g, dtype, 8, 128)],
    }


# Wan 2.1: video DiT with 3D patches, cross-attention to T5 features, 6-way scale-shift table.
def _wan() -> torch.nn.Module:
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=128, freq_dim=64, ffn_dim=256, num_layers=1, rope_max_seq_len=32,
    )  # fmt: skip


def _wan_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(21)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 2, 8, 8),  # [B, C, F, H, W]
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([500], dtype=torch.long),
    }


# HunyuanVideo: FLUX-like double + single blocks, a token refiner on the text, CLIP pooled projection.
def _hunyuan() -> torch.nn.Module:
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=128, pooled_projection_dim=64, rope_axes_dim=(16, 24, 24),
    )  # fmt: skip


def _hunyuan_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(22)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 2, 8, 8),
        "timestep": torch.tensor([500], dtype=torch.long),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.long),
        "pooled_projections": _randn(g, dtype, 1, 64),
        "guidance": torch.tensor([6000.0], dtype=dtype),
    }


# LTX-Video: PixArt-style adaLN-single video DiT on already-patchified latent tokens.
def _ltx() -> torch.nn.Module:
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=64, out_channels=64, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=64,
        cross_attention_dim=128, num_layers=1, caption_channels=128,
    )  # fmt: skip


def _ltx_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(23)
    return {
        "hidden_states": _randn(g, dtype, 1, 2 * 4 * 4, 64),  # [B, F*H*W, C]
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([500], dtype=torch.long),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.long),
        "num_frames": 2,
        "height": 4,
        "width": 4,
    }


# AuraFlow: MMDiT joint blocks followed by single DiT blocks, no pooled text.
def _auraflow() -> torch.nn.Module:
    return diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128,
        out_channels=4, pos_embed_max_size=64,
    )  # fmt: skip


def _auraflow_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(24)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([500.0], dtype=dtype),
    }


# Lumina-Image-2.0: grouped-query attention, SwiGLU, caption / noise refiner blocks.
def _lumina2() -> torch.nn.Module:
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=128, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=64, axes_dim_rope=(16, 24, 24), axes_lens=(64, 32, 32),
        cap_feat_dim=128,
    )  # fmt: skip


def _lumina2_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(25)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 8, 8),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool),
    }


# CogView4: single-stream DiT over [text, image] with SDXL-like size / crop conditions.
def _cogview4() -> torch.nn.Module:
    return diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=64, num_attention_heads=2,
        text_embed_dim=128, time_embed_dim=64, condition_dim=64, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16),
    )  # fmt: skip


def _cogview4_inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(26)
    size = torch.tensor([[64.0, 64.0]], dtype=dtype)
    return {
        "hidden_states": _randn(g, dtype, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, dtype, 1, 8, 128),
        "timestep": torch.tensor([500.0], dtype=dtype),
        "original_size": size,
        "target_size": size,
        "crop_coords": torch.zeros(1, 2, dtype=dtype),
    }


_FAMILIES = [
    # name, diffusers class name, builder, inputs, pipeline
    ("flux", "FluxTransformer2DModel", _flux, _flux_inputs, "FluxPipeline"),
    ("flux2", "Flux2Transformer2DModel", _flux2, _flux2_inputs, "Flux2Pipeline"),
    ("chroma", "ChromaTransformer2DModel", _chroma, _chroma_inputs, "ChromaPipeline"),
    ("sd3", "SD3Transformer2DModel", _sd3, _sd3_inputs, "StableDiffusion3Pipeline"),
    ("sdxl", "UNet2DConditionModel", _sdxl, _sdxl_inputs, "StableDiffusionXLPipeline"),
    ("sd15", "UNet2DConditionModel", _sd15, _sd15_inputs, "StableDiffusionPipeline"),
    ("sana", "SanaTransformer2DModel", _sana, _sana_inputs, "SanaPipeline"),
    ("pixart_sigma", "PixArtTransformer2DModel", _pixart, _pixart_inputs, "PixArtSigmaPipeline"),
    ("qwen_image", "QwenImageTransformer2DModel", _qwen, _qwen_inputs, "QwenImagePipeline"),
    ("z_image", "ZImageTransformer2DModel", _zimage, _zimage_inputs, "ZImagePipeline"),
    ("wan", "WanTransformer3DModel", _wan, _wan_inputs, "WanPipeline"),
    ("hunyuan_video", "HunyuanVideoTransformer3DModel", _hunyuan, _hunyuan_inputs, "HunyuanVideoPipeline"),
    ("ltx_video", "LTXVideoTransformer3DModel", _ltx, _ltx_inputs, "LTXPipeline"),
    ("auraflow", "AuraFlowTransformer2DModel", _auraflow, _auraflow_inputs, "AuraFlowPipeline"),
    ("lumina2", "Lumina2Transformer2DModel", _lumina2, _lumina2_inputs, "Lumina2Pipeline"),
    ("cogview4", "CogView4Transformer2DModel", _cogview4, _cogview4_inputs, "CogView4Pipeline"),
]

# The families whose model class this diffusers has (older releases lack the newer ones).
FAMILIES: dict[str, Family] = {
    name: Family(name, getattr(diffusers, cls), build, inputs, pipeline)
    for name, cls, build, inputs, pipeline in _FAMILIES
    if hasattr(diffusers, cls)
}
# The families left out, with the class they need, so a test can say what it skipped.
MISSING: dict[str, str] = {name: cls for name, cls, *_ in _FAMILIES if not hasattr(diffusers, cls)}


def output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's main output for one call, without autograd, as one tensor (Z-Image returns a list of
    per-image tensors: they are stacked)."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out
