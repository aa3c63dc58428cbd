"""Tiny random-weight diffusers models (same layer kinds as FLUX / SD3 / SD-UNet) and their inputs.

Hidden sizes are multiples of 64 so the attention and feed-forward linears are quantizable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel


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


def _tokenizer(path):
    """A byte-level-free CLIP BPE tokenizer over single letters, written locally (no download)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [f"{c}</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)


def build_pipeline(root):
    """A tiny random-weight FluxPipeline (CLIP + T5 encoders, VAE, transformer) saved under ``root/pipe``."""
    torch.manual_seed(0)
    tok = _tokenizer(root / "tok")
    vocab = len(tok)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
                          down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                          norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.0, scaling_factor=1.0),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=1, num_attention_heads=2, projection_dim=64,
                                                  bos_token_id=vocab - 2, eos_token_id=vocab - 1)),
        tokenizer=tok,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=vocab, d_model=128, d_kv=64, d_ff=256, num_layers=1,
                                               num_heads=2)),
        tokenizer_2=tok,
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                                           pooled_projection_dim=64, axes_dims_rope=[16, 24, 24]),
    )  # fmt: skip
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


# What every call of the tiny pipeline needs: its images are 32 x 32 and its tokenizers take 16 tokens.
TINY_PIPELINE_KWARGS = {"height": 32, "width": 32, "guidance_scale": 1.0, "max_sequence_length": 16}
