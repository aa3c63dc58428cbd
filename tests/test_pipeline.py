"""A whole diffusers pipeline with an SVDQuant denoiser and text encoder, through PipelineQuantizationConfig."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from models import TINY_PIPELINE_KWARGS, build_pipeline

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("flux-pipe"))


def _generate(pipe):
    out = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
               **TINY_PIPELINE_KWARGS)  # fmt: skip
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
        pipeline_dir, subfolder="transformer", quantization_config=SVDQuantConfig(rank=16)
    )
    pipe = FluxPipeline.from_pretrained(pipeline_dir, transformer=transformer)
    assert pipe.transformer is transformer
    assert torch.isfinite(_generate(pipe)).all()
