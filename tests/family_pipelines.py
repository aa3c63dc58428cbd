"""The tiny rest of each family's real diffusers pipeline, around the family's denoiser from tests/families.py.

Per family: the pipeline class its checkpoints name, with its scheduler class, a tiny VAE of the class that
pipeline takes, tiny random-weight text encoder(s) of the real classes, and tokenizers built in code (single
printable characters as tokens, so nothing is downloaded) of the class the pipeline's signature names; where it
names an Auto class or a processor, one like the checkpoint's (CogView4: a byte-level BPE for GLM-4's; FLUX.2:
its Mistral tokenizer with a chat template instead of the Pixtral processor, which needs torchvision). Widths
fit the denoiser's text / pooled inputs. ``call`` is the smallest call the pipeline accepts (one or two latent
frames, the smallest side its checks, VAE and patch sizes allow, prompts cut at 16 or 32 tokens, no
classifier-free guidance); ``latent_shape`` is what ``output_type="latent"`` gives.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch
import transformers as tf
from families import FAMILIES

PROMPT = "a red fox in the snow, watercolor"
_CHARS = [c for c in string.printable if not c.isspace()]
# One chat template for the pipelines that format prompts as chat messages (FLUX.2's Mistral, Z-Image's
# Qwen3): plain "role: text" lines, with the content a string or a list of {"type": "text"} parts.
_CHAT = (
    "{%- for m in messages -%}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}\n{% endfor -%}"
    "{%- if add_generation_prompt %}assistant: {% endif -%}"
)


@dataclass
class FamilyPipeline:
    """How to build one family's pipeline around its denoiser, and the smallest call it runs."""

    name: str
    build: Callable[[torch.nn.Module], diffusers.DiffusionPipeline]
    call: dict
    latent_shape: tuple[int, ...]
    denoiser: str = "transformer"
    steps: int = 1


# ---------------------------------------------------------------------------------------------------- tokenizers


def _tokenizer(cls: type, max_length: int = 64, special: tuple[str, ...] = (), **kwargs) -> tf.PreTrainedTokenizerBase:
    """A tokenizer of the class ``cls`` over single printable characters (one token each) and ``special``."""
    if cls is tf.CLIPTokenizer:  # BPE with an end-of-word suffix
        words = _CHARS + [c + "</w>" for c in _CHARS] + ["<|startoftext|>", "<|endoftext|>"]
        tok = cls(vocab={w: i for i, w in enumerate(words)}, merges=[], **kwargs)
    elif cls is tf.T5Tokenizer:  # SentencePiece unigram, "▁" for spaces
        pieces = ["<pad>", "</s>", "<unk>", "▁", *_CHARS]
        tok = cls(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], extra_ids=0, **kwargs)
    elif cls in (tf.LlamaTokenizer, tf.GemmaTokenizer):  # SentencePiece BPE, "▁" for spaces
        first = ["<unk>", "<s>", "</s>"] if cls is tf.LlamaTokenizer else ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
        words = [*first, "▁", *_CHARS]
        tok = cls(vocab={w: i for i, w in enumerate(words)}, merges=[], **kwargs)
    elif cls is tf.Qwen2Tokenizer:  # byte-level BPE: "Ġ" is the space byte, "Ċ" the newline
        words = ["<|endoftext|>", "Ġ", "Ċ", *_CHARS]
        tok = cls(vocab={w: i for i, w in enumerate(words)}, merges=[], **kwargs)
    else:
        raise TypeError(cls)
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.model_max_length = max_length
    return tok


# ------------------------------------------------------------------------------------------------- text encoders


def _clip(tok, hidden: int, projection: int | None = None) -> torch.nn.Module:
    """A 1-layer CLIP text model; ``projection``: the ``...WithProjection`` class (SD3 / SDXL's second encoder).
    77 positions, as the real ones: HunyuanVideo asks for 77 tokens whatever the tokenizer's length."""
    config = tf.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=projection or hidden, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return (tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel)(config).eval()


def _t5(tok, d_model: int, cls: type = tf.T5EncoderModel) -> torch.nn.Module:
    """A 1-layer T5 (or UMT5) encoder."""
    config_cls = tf.UMT5Config if cls is tf.UMT5EncoderModel else tf.T5Config
    config = config_cls(vocab_size=len(tok), d_model=d_model, d_kv=64, d_ff=2 * d_model, num_layers=1, num_heads=2)
    return cls(config).eval()


def _decoder_llm(tok, config_cls: type, model_cls: type, hidden: int, layers: int = 2, **extra) -> torch.nn.Module:
    """A small decoder-only language model (Gemma2, Llama, Qwen3, GLM, Mistral) used as a text encoder."""
    config = config_cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, **extra,
    )  # fmt: skip
    return model_cls(config).eval()


# ------------------------------------------------------------------------------------------------------------ VAEs


def _vae_kl(latent_channels: int, levels: int = 1) -> diffusers.AutoencoderKL:
    """An ``AutoencoderKL`` of 32-channel blocks; ``levels`` sets the downsampling (2 ** (levels - 1)). With a
    shift factor, which the flow-matching pipelines (FLUX, SD3, Z-Image...) add when decoding."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=32, shift_factor=0.0,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------- families
# Each builder takes the family's denoiser (tests/families.py) and returns the pipeline around it. Guidance
# that would double the batch (classifier-free guidance) is off in the calls: one denoiser pass per step.

_FLOW = diffusers.FlowMatchEulerDiscreteScheduler


def _flux(transformer):
    clip, t5 = _tokenizer(tf.CLIPTokenizer, 16), _tokenizer(tf.T5Tokenizer)
    return diffusers.FluxPipeline(
        scheduler=_FLOW(), vae=_vae_kl(16), text_encoder=_clip(clip, 64), tokenizer=clip,
        text_encoder_2=_t5(t5, 128), tokenizer_2=t5, transformer=transformer,
    )  # fmt: skip


def _flux2(transformer):
    # Mistral-Small ships a Pixtral processor, which transformers builds only with torchvision (not
    # installable beside this torch); for text prompts the pipeline calls only its tokenizer's
    # apply_chat_template, so the tokenizer with a chat template stands in. Two 64-wide hidden states
    # stacked make the denoiser's 128-wide text features (the real model stacks three).
    tok = _tokenizer(tf.LlamaTokenizer, special=("[IMG]", "[IMG_BREAK]", "[IMG_END]"), pad_token="<unk>")
    tok.chat_template = _CHAT
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32)  # fmt: skip
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    img = tok.convert_tokens_to_ids("[IMG]")
    config = tf.Mistral3Config(text_config=text, vision_config=vision, image_token_index=img)
    return diffusers.Flux2Pipeline(
        scheduler=_FLOW(), vae=diffusers.AutoencoderKLFlux2(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32,), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=32,
            use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=tf.Mistral3ForConditionalGeneration(config).eval(), tokenizer=tok, transformer=transformer,
    )  # fmt: skip


def _chroma(transformer):
    t5 = _tokenizer(tf.T5Tokenizer)
    return diffusers.ChromaPipeline(
        scheduler=_FLOW(), vae=_vae_kl(16), text_encoder=_t5(t5, 128), tokenizer=t5, transformer=transformer
    )


def _sd3(transformer):
    # Each CLIP's hidden states (64 + 64) make the 128-wide text features beside T5's; their projections
    # (32 + 32) the 64-wide pooled vector.
    clip, t5 = _tokenizer(tf.CLIPTokenizer, 16), _tokenizer(tf.T5Tokenizer)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_FLOW(), vae=_vae_kl(4), text_encoder=_clip(clip, 64, 32),
        tokenizer=clip, text_encoder_2=_clip(clip, 64, 32), tokenizer_2=clip, text_encoder_3=_t5(t5, 128),
        tokenizer_3=t5,
    )  # fmt: skip


def _sdxl(unet):
    clip = _tokenizer(tf.CLIPTokenizer, 16)
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae_kl(4), text_encoder=_clip(clip, 64), text_encoder_2=_clip(clip, 64, 64), tokenizer=clip,
        tokenizer_2=clip, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(), add_watermarker=False,
    )  # fmt: skip


def _sd15(unet):
    clip = _tokenizer(tf.CLIPTokenizer, 16)
    return diffusers.StableDiffusionPipeline(
        vae=_vae_kl(4), text_encoder=_clip(clip, 128), tokenizer=clip, unet=unet,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def _sana(transformer):
    tok = _tokenizer(tf.GemmaTokenizer)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3, encoder_block_out_channels=(16,) * 3,
        decoder_block_out_channels=(16,) * 3, encoder_qkv_multiscales=((),) * 3, decoder_qkv_multiscales=((),) * 3,
        encoder_layers_per_block=(1,) * 3, decoder_layers_per_block=(1,) * 3, decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    )  # fmt: skip
    # Sana's DPM-Solver++ runs on flow-matching sigmas, as in its checkpoints' scheduler config.
    scheduler = diffusers.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    text = _decoder_llm(tok, tf.Gemma2Config, tf.Gemma2Model, 128)
    return diffusers.SanaPipeline(
        tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _pixart(transformer):
    t5 = _tokenizer(tf.T5Tokenizer)
    return diffusers.PixArtSigmaPipeline(
        tokenizer=t5, text_encoder=_t5(t5, 128), vae=_vae_kl(4), transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )  # fmt: skip


def _qwen(transformer):
    tok = _tokenizer(tf.Qwen2Tokenizer, special=("<|im_start|>", "<|im_end|>"))
    # Multimodal RoPE: the 3 sections (time, height, width) split the 32 rotary frequencies of a 64-wide head.
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, bos_token_id=None, eos_token_id=tok.eos_token_id,
                rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128)
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tok), hidden_size=128)
    # Its VAE halves the image (one downsampling level); the real one divides it by 8.
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=32, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]
    )
    return diffusers.QwenImagePipeline(
        scheduler=_FLOW(), vae=vae, text_encoder=tf.Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tok,
        transformer=transformer,
    )  # fmt: skip


def _zimage(transformer):
    tok = _tokenizer(tf.Qwen2Tokenizer)
    tok.chat_template = _CHAT
    text = _decoder_llm(tok, tf.Qwen3Config, tf.Qwen3Model, 128)
    return diffusers.ZImagePipeline(
        scheduler=_FLOW(), vae=_vae_kl(4), text_encoder=text, tokenizer=tok, transformer=transformer
    )


def _wan(transformer):
    tok = _tokenizer(tf.T5Tokenizer)
    vae = diffusers.AutoencoderKLWan(
        base_dim=16, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2,
    )  # fmt: skip
    return diffusers.WanPipeline(
        tokenizer=tok, text_encoder=_t5(tok, 128, tf.UMT5EncoderModel), vae=vae, scheduler=_FLOW(shift=5.0),
        transformer=transformer,
    )  # fmt: skip


def _hunyuan(transformer):
    llama, clip = _tokenizer(tf.LlamaTokenizer, 512, pad_token="<unk>"), _tokenizer(tf.CLIPTokenizer, 16)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(16,) * 4, layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=2, temporal_compression_ratio=4,
    )  # fmt: skip
    # The pipeline takes the hidden states 2 layers before the last one: 3 layers.
    text = _decoder_llm(llama, tf.LlamaConfig, tf.LlamaModel, 128, layers=3)
    return diffusers.HunyuanVideoPipeline(
        text_encoder=text, tokenizer=llama, transformer=transformer, vae=vae, scheduler=_FLOW(shift=7.0),
        text_encoder_2=_clip(clip, 64), tokenizer_2=clip,
    )  # fmt: skip


def _ltx(transformer):
    t5 = _tokenizer(tf.T5Tokenizer)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=64, block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16), layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False),
        upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    return diffusers.LTXPipeline(
        scheduler=_FLOW(), vae=vae, text_encoder=_t5(t5, 128), tokenizer=t5, transformer=transformer
    )


def _auraflow(transformer):
    t5 = _tokenizer(tf.T5Tokenizer)
    return diffusers.AuraFlowPipeline(
        tokenizer=t5, text_encoder=_t5(t5, 128, tf.UMT5EncoderModel), vae=_vae_kl(4), transformer=transformer,
        scheduler=_FLOW(),
    )  # fmt: skip


def _lumina2(transformer):
    tok = _tokenizer(tf.GemmaTokenizer)
    text = _decoder_llm(tok, tf.Gemma2Config, tf.Gemma2Model, 128)
    # Four levels: the pipeline takes its VAE to divide the image by 8, whatever the VAE's config says.
    return diffusers.Lumina2Pipeline(
        transformer=transformer, scheduler=_FLOW(), vae=_vae_kl(4, 4), text_encoder=text, tokenizer=tok
    )


def _cogview4(transformer):
    # GLM-4's tokenizer is a byte-level BPE like Qwen's; the pipeline loads it through AutoTokenizer.
    tok = _tokenizer(tf.Qwen2Tokenizer)
    text = _decoder_llm(tok, tf.GlmConfig, tf.GlmModel, 128)
    scheduler = _FLOW(base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True,
                      time_shift_type="linear")  # fmt: skip
    return diffusers.CogView4Pipeline(
        tokenizer=tok, text_encoder=text, vae=_vae_kl(4, 2), transformer=transformer, scheduler=scheduler
    )


def _family(name, build, side, latent_shape, denoiser="transformer", steps=1, **call) -> FamilyPipeline:
    # Square images; prompts cut at 16 tokens where the pipeline lets the caller say so.
    call = {"height": side, "width": side} | ({} if denoiser == "unet" else {"max_sequence_length": 16}) | call
    return FamilyPipeline(name, build, call, latent_shape, denoiser, steps)


_NO_CFG = {"guidance_scale": 1.0}
# Sides: the smallest the pipeline's checks and its VAE / patch sizes allow with an 8 x 8 latent where they can
# (Qwen-Image's VAE halves, Lumina2 assumes an 8x VAE, Sana / LTX ask for multiples of 32).
PIPELINES: dict[str, FamilyPipeline] = {
    p.name: p
    for p in [
        _family("flux", _flux, 8, (1, 16, 64), guidance_scale=3.5),
        _family("flux2", _flux2, 8, (1, 16, 64), guidance_scale=4.0, text_encoder_out_layers=[1, 2]),
        _family("chroma", _chroma, 8, (1, 16, 64), **_NO_CFG),
        _family("sd3", _sd3, 8, (1, 4, 8, 8), **_NO_CFG),
        _family("sdxl", _sdxl, 8, (1, 4, 8, 8), "unet", **_NO_CFG),
        # PNDM's first step with one inference step barely moves the sample (the latents change by 2e-4 for a
        # 10% change of the UNet's output); with two they change by 0.026.
        _family("sd15", _sd15, 8, (1, 4, 8, 8), "unet", steps=2, **_NO_CFG),
        _family("sana", _sana, 32, (1, 4, 8, 8), complex_human_instruction=None, use_resolution_binning=False,
                **_NO_CFG),
        _family("pixart_sigma", _pixart, 8, (1, 4, 8, 8), use_resolution_binning=False, **_NO_CFG),
        _family("qwen_image", _qwen, 16, (1, 16, 64), true_cfg_scale=1.0),
        _family("z_image", _zimage, 8, (1, 4, 8, 8), guidance_scale=0.0, max_sequence_length=32),
        _family("wan", _wan, 16, (1, 4, 2, 8, 8), num_frames=3, **_NO_CFG),
        _family("hunyuan_video", _hunyuan, 16, (1, 4, 2, 8, 8), num_frames=5, guidance_scale=6.0),
        _family("ltx_video", _ltx, 32, (1, 128, 64), num_frames=5, **_NO_CFG),
        _family("auraflow", _auraflow, 8, (1, 4, 8, 8), **_NO_CFG),
        _family("lumina2", _lumina2, 64, (1, 4, 8, 8), max_sequence_length=32, system_prompt="draw:", **_NO_CFG),
        _family("cogview4", _cogview4, 16, (1, 4, 8, 8), **_NO_CFG),
    ]
}  # fmt: skip


def build(name: str) -> diffusers.DiffusionPipeline:
    """The family's whole tiny pipeline in float32, its denoiser from tests/families.py, seeded."""
    torch.manual_seed(0)
    denoiser = FAMILIES[name].build()
    return PIPELINES[name].build(denoiser)
