"""A whole diffusers pipeline with an SVDQuant denoiser and text encoder, through PipelineQuantizationConfig."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear


def _tokenizer(path):
    """A byte-level-free CLIP BPE tokenizer over single letters, written locally (no download)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [f"{c}</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"])}
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("flux-pipe"))


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


def _generate(pipe):
    out = pipe("a cat", num_inference_steps=2, height=32, width=32, guidance_scale=1.0, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    return out.images


def test_pipeline_quantization_config(pipeline_dir, tmp_path):
    """PipelineQuantizationConfig quantizes the denoiser (diffusers) and the T5 encoder (transformers) with
    one SVDQuantConfig; the pipeline generates; saving and reloading it needs no config."""
    reference = _generate(FluxPipeline.from_pretrained(pipeline_dir))
    pq = PipelineQuantizationConfig(quant_mapping={
        "transformer": SVDQuantConfig(rank=16), "text_encoder_2": SVDQuantConfig(rank=16)})  # fmt: skip
    pipe = FluxPipeline.from_pretrained(pipeline_dir, quantization_config=pq)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, SVDQuantLinear)
    assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, SVDQuantLinear)
    assert not any(isinstance(m, SVDQuantLinear) for m in pipe.text_encoder.modules())
    images = _generate(pipe)
    assert images.shape == reference.shape and torch.isfinite(images).all()
    assert (images - reference).abs().mean() < 0.1

    pipe.save_pretrained(tmp_path / "q")
    reloaded = FluxPipeline.from_pretrained(tmp_path / "q")
    for component in ("transformer", "text_encoder_2"):
        saved = getattr(reloaded, component).state_dict()
        for name, t in getattr(pipe, component).state_dict().items():
            assert torch.equal(saved[name], t), f"{component}.{name}"
    again = _generate(reloaded)
    # Not bit for bit here: the 16-bit float32 layers (time embedder, norms) are zero-copy views of the
    # mmap'd checkpoint, and torch's fp32 GEMM rounds differently with the data's alignment (checked: the
    # same nn.Linear weights at pointer % 64 = 16 vs 8 give different bits). The quantized tensors
    # are equal (the bf16 round trip in test_quantizer.py is bit for bit).
    torch.testing.assert_close(again, images, atol=1e-5, rtol=0)


def test_quantized_transformer_passed_to_pipeline(pipeline_dir):
    """The other documented route: quantize the denoiser alone and hand it to the pipeline."""
    transformer = FluxTransformer2DModel.from_pretrained(
        pipeline_dir, subfolder="transformer", quantization_config=SVDQuantConfig(rank=16))
    pipe = FluxPipeline.from_pretrained(pipeline_dir, transformer=transformer)
    assert pipe.transformer is transformer
    assert torch.isfinite(_generate(pipe)).all()
