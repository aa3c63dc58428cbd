"""LoRA on quantized models through diffusers' and PEFT's own calls (integrations/peft.py).

The property everything is checked against: a quantized layer with LoRAs computes the quantized layer's output
plus each LoRA's delta ``w · s · (x Aᵀ) Bᵀ`` on the same input, to 16-bit rounding (the LoRA is exact, only the
residual is 4-bit); fusing moves the LoRA into the low-rank branch without changing that beyond 16-bit rounding,
and unfusing / unloading gives the original tensors and outputs back bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys

import diffusers
import peft
import pytest
import torch
import transformers.integrations.peft as transformers_peft
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers.quantizers import PipelineQuantizationConfig
from models import TINY_MODELS, _tokenizer, rel_err, run
from packaging.version import Version
from peft import LoraConfig, get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear, SVDQuantLoraLinear, W4A16Linear
from diffusers_svdquant.integrations.peft import fused_loras

DTYPE = torch.bfloat16
EPS = 2.0**-7  # bfloat16's spacing at 1: "to 16-bit rounding"
NAMES = ("flux", "sd3", "unet")
# Fused vs unfused at the model output. Each layer agrees to 16-bit rounding (checked call by call); the model
# carries those roundings on, and a quantized model is discontinuous in its input: a one-ulp difference can flip an
# INT4 activation code of the next layer (a step of 1/14 of its group's absmax). The tiny random UNet amplifies most
# (a 16-bit one moves 1.5% under 2^-9 noise on every linear; flux and sd3 0.5% and 0.3%). In float32 fused and
# unfused agree to 1e-6 (test_fused_equals_unfused_to_float32_rounding_in_a_float32_model).
MODEL_TOL = {"flux": 2 * EPS, "sd3": 2 * EPS, "unet": 12 * EPS}


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory):
    """Each tiny model quantized (rank 8, bf16) and saved: loading it back is the per-test fresh model."""
    dirs = {}
    for name in NAMES:
        tiny = TINY_MODELS[name]
        torch.manual_seed(0)
        src = tmp_path_factory.mktemp(f"{name}16")
        tiny.build().to(DTYPE).save_pretrained(src)
        dirs[name] = tmp_path_factory.mktemp(f"{name}q")
        tiny.cls.from_pretrained(src, dtype=DTYPE, quantization_config=SVDQuantConfig(rank=8)).save_pretrained(
            dirs[name]
        )
    return dirs


def _load(quantized_dirs, name):
    return TINY_MODELS[name].cls.from_pretrained(quantized_dirs[name]).eval()


def _out(model, name):
    return run(model, TINY_MODELS[name].inputs(DTYPE))


def _quantized_names(model, limit=None):
    names = [n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)]
    return names[:limit]


def _lora(model, names, r=4, seed=0, alpha=None):
    """A PEFT-format LoRA state dict (``<layer>.lora_A.weight`` [r, K], ``lora_B.weight`` [N, r]) for ``names``,
    sized so its delta is a few percent of the layer's output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        m = model.get_submodule(n)
        k, out = m.in_features, m.out_features
        sd[f"{n}.lora_A.weight"] = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(DTYPE)
        sd[f"{n}.lora_B.weight"] = (torch.randn(out, r, generator=g) * 0.2).to(DTYPE)
    return sd


def _tensors(model):
    """Every SVDQuantLinear's canonical tensors by name, cloned (the PEFT wrapper's ``base_layer.`` dropped)."""
    return {
        f"{n.replace('.base_layer', '')}.{t}": p.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, SVDQuantLinear)
        for t, p in m.named_parameters(recurse=False)
    }


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def _layer_calls(model):
    """Record ``(layer, x, y)`` of every SVDQuantLoraLinear call in the block."""
    calls, hooks = [], []
    for m in model.modules():
        if isinstance(m, SVDQuantLoraLinear):
            hooks.append(m.register_forward_hook(lambda mod, args, y: calls.append((mod, args[0], y))))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _base_plus_deltas(layer, x, weights=None, fp32=False):
    """The quantized layer's output plus each active adapter's ``scaling · (x Aᵀ) Bᵀ``: in 16-bit like PEFT, or
    accumulated in float32 (what the fused kernel does)."""
    with torch.no_grad():
        y = layer.base_layer(x)
        acc = y.float() if fp32 else y
        for name in (n for n in layer.active_adapters if n in layer.lora_A):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            s = layer.scaling[name]
            if fp32:
                acc = acc + (x.float() @ a.float().t()) @ b.float().t() * s
            else:
                acc = acc + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * s
        return acc.to(y.dtype)


def _check_fused_calls(calls):
    """Each fused call's output is the unfused layer's base output plus the float32 deltas, to 16-bit rounding."""
    assert calls
    for layer, x, y in calls:
        merged = layer.merged_adapters[:]
        layer.unmerge()
        want = _base_plus_deltas(layer, x, fp32=True)
        layer.merge(adapter_names=merged)
        torch.testing.assert_close(y, want, rtol=2 * EPS, atol=2 * EPS * want.abs().max().item())


def _check_calls(calls, fp32=False, scale=2 * EPS):
    assert calls
    for layer, x, y in calls:
        want = _base_plus_deltas(layer, x, fp32=fp32)
        torch.testing.assert_close(y, want, rtol=scale, atol=scale * want.abs().max().item())


# ------------------------------------------------------------------------------------ load, unfused


@pytest.mark.parametrize("name", NAMES)
def test_unfused_lora_is_the_quantized_output_plus_the_16bit_delta(quantized_dirs, name):
    model = _load(quantized_dirs, name)
    base = _out(model, name)
    targets = _quantized_names(model)
    # Both kinds take LoRAs: FLUX's and SD3's AdaLN linears are weight-only (W4A16), the rest W4A4.
    assert name == "unet" or {type(model.get_submodule(n)) for n in targets} == {SVDQuantLinear, W4A16Linear}
    sd = _lora(model, targets)
    model.load_lora_adapter(sd, adapter_name="style", prefix=None)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SVDQuantLoraLinear)]
    assert wrapped == targets
    for n in targets:  # the file's tensors, as they are (bf16 model: no cast)
        assert torch.equal(model.get_submodule(n).lora_A["style"].weight, sd[f"{n}.lora_A.weight"])
        assert torch.equal(model.get_submodule(n).lora_B["style"].weight, sd[f"{n}.lora_B.weight"])
    with _layer_calls(model) as calls:
        with_lora = _out(model, name)
    _check_calls(calls)
    assert rel_err(with_lora, base) > 4 * EPS  # the LoRA does something


@pytest.mark.parametrize("name", NAMES)
def test_fuse_equals_unfused_and_unfuse_unload_restore_bits(quantized_dirs, name):
    model = _load(quantized_dirs, name)
    base, tensors = _out(model, name), _tensors(model)
    targets = _quantized_names(model)
    model.load_lora_adapter(_lora(model, targets, r=4), adapter_name="style", prefix=None)
    unfused = _out(model, name)

    model.fuse_lora()
    layer = model.get_submodule(targets[0])
    assert layer.base_layer.rank == 8 + 4 and fused_loras(layer.base_layer) == [("style", 4)]
    with _layer_calls(model) as calls:
        fused = _out(model, name)
    _check_fused_calls(calls)
    assert rel_err(fused, unfused) < MODEL_TOL[name]

    model.unfuse_lora()
    _assert_same_tensors(_tensors(model), tensors)
    assert torch.equal(_out(model, name), unfused)
    model.unload_lora()
    assert not any(isinstance(m, SVDQuantLoraLinear) for m in model.modules())
    _assert_same_tensors(_tensors(model), tensors)
    assert torch.equal(_out(model, name), base)


def test_fused_equals_unfused_to_float32_rounding_in_a_float32_model(tmp_path):
    """The fold itself is exact: in a float32 model (the tiny UNet, the most sensitive) fused == unfused to 1e-5."""
    tiny = TINY_MODELS["unet"]
    torch.manual_seed(0)
    tiny.build().save_pretrained(tmp_path / "16")
    model = tiny.cls.from_pretrained(tmp_path / "16", quantization_config=SVDQuantConfig(rank=8)).eval()
    sd = {k: v.float() for k, v in _lora(model, _quantized_names(model)).items()}
    model.load_lora_adapter(sd, adapter_name="style", prefix=None)
    inputs = tiny.inputs(torch.float32)
    unfused = run(model, inputs)
    model.fuse_lora()
    assert rel_err(run(model, inputs), unfused) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_two_loras_with_weights_compose_switch_and_delete(quantized_dirs, name):
    model = _load(quantized_dirs, name)
    base, tensors = _out(model, name), _tensors(model)
    targets = _quantized_names(model)
    model.load_lora_adapter(_lora(model, targets, r=4, seed=1), adapter_name="a", prefix=None)
    model.load_lora_adapter(_lora(model, targets[::2], r=6, seed=2), adapter_name="b", prefix=None)
    model.set_adapters(["a", "b"], weights=[0.8, 0.5])
    layer = model.get_submodule(targets[0])
    assert layer.scaling == {"a": 0.8 * 1.0, "b": 0.5 * 1.0}  # lora_alpha = r: scaling is the weight
    with _layer_calls(model) as calls:
        both = _out(model, name)
    _check_calls(calls)

    model.fuse_lora()
    assert layer.base_layer.rank == 8 + 4 + 6 and [n for n, _ in fused_loras(layer.base_layer)] == ["a", "b"]
    assert model.get_submodule(targets[1]).base_layer.rank == 8 + 4  # "b" touched every other layer
    assert rel_err(_out(model, name), both) < MODEL_TOL[name]
    model.unfuse_lora()
    _assert_same_tensors(_tensors(model), tensors)
    assert torch.equal(_out(model, name), both)

    model.disable_lora()
    assert torch.equal(_out(model, name), base)
    model.enable_lora()
    assert torch.equal(_out(model, name), both)
    model.set_adapters("b")
    only_b = _out(model, name)
    model.delete_adapters("a")
    assert torch.equal(_out(model, name), only_b)
    assert "a" not in layer.lora_A and "b" in layer.lora_A


# ------------------------------------------------------------------------------- formats and pipelines


@pytest.fixture(scope="module")
def sd_pipe_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline (the UNet of tests/models.py, a CLIP text encoder of width 128) saved, and a
    LoRA made with peft on its 16-bit UNet and text encoder, saved with diffusers' ``save_lora_weights``."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tok = _tokenizer(root / "tok")
    vocab = len(tok)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
                          down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                          norm_num_groups=32),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                                                  num_hidden_layers=1, num_attention_heads=2, projection_dim=64,
                                                  bos_token_id=vocab - 2, eos_token_id=vocab - 1)),
        tokenizer=tok, unet=TINY_MODELS["unet"].build(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "pipe")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
                                     init_lora_weights=False))  # fmt: skip
    with _peft_gate_lifted():
        pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"],
                                                 init_lora_weights=False))  # fmt: skip
    StableDiffusionPipeline.save_lora_weights(
        root / "lora",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
    )
    return root


@contextlib.contextmanager
def _peft_gate_lifted():
    """transformers 5.24's adapter methods ask for peft >= 0.22, newer than any peft on the index this project
    installs from (0.21.2); its load_adapter path itself runs on 0.21. Lift the version gate (only when the
    installed peft is older) so diffusers' text-encoder LoRA path can be exercised."""
    original = transformers_peft.check_peft_version
    if Version(peft.__version__) < Version(transformers_peft.MIN_PEFT_VERSION):
        transformers_peft.check_peft_version = lambda **kwargs: None
    try:
        yield
    finally:
        transformers_peft.check_peft_version = original


def _sd_quantized(sd_pipe_dir):
    q = {"unet": SVDQuantConfig(rank=8), "text_encoder": SVDQuantConfig(rank=8)}
    return StableDiffusionPipeline.from_pretrained(
        sd_pipe_dir / "pipe", torch_dtype=DTYPE, quantization_config=PipelineQuantizationConfig(quant_mapping=q)
    )


def _latents(pipe):
    return pipe("abc", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0),
                output_type="latent").images  # fmt: skip


def _kohya(sd, alpha):
    """diffusers/PEFT ``unet.<layer>.lora_A.weight`` names as kohya / A1111 ``lora_unet_<layer_>.lora_down.weight``
    (``text_encoder.`` → ``lora_te_text_model_``), with an ``.alpha`` per layer."""
    out = {}
    for k, v in sd.items():
        module, _, kind = k.rpartition(".lora_")
        component, _, path = module.partition(".")
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        stem = prefix + path.replace(".", "_")
        out[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def test_pipeline_loads_a_peft_lora_saved_by_diffusers_into_unet_and_quantized_text_encoder(sd_pipe_dir):
    """SD pipeline with a quantized UNet and a CLIPTextModel quantized through the transformers integration:
    pipe.load_lora_weights(file saved by save_lora_weights) wraps both; fuse / unfuse / unload round-trip."""
    pipe = _sd_quantized(sd_pipe_dir)
    base, unet_t, te_t = _latents(pipe), _tensors(pipe.unet), _tensors(pipe.text_encoder)
    with _peft_gate_lifted():
        pipe.load_lora_weights(sd_pipe_dir / "lora", adapter_name="style")
    q_proj = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("q_proj"))
    assert isinstance(q_proj, SVDQuantLoraLinear)
    assert sum(isinstance(m, SVDQuantLoraLinear) for m in pipe.unet.modules()) >= 8
    # transformers' adapter report lists the canonical lora_down / lora_up as "missing" (their names hold
    # "lora"); they are not touched:
    _assert_same_tensors(_tensors(pipe.text_encoder), te_t)
    with _layer_calls(pipe.unet) as calls, _layer_calls(pipe.text_encoder) as te_calls:
        styled = _latents(pipe)
    _check_calls(calls)
    _check_calls(te_calls)
    assert rel_err(styled, base) > 4 * EPS
    pipe.fuse_lora(components=["unet", "text_encoder"])
    assert q_proj.base_layer.rank == 12
    with _layer_calls(pipe.unet) as calls, _layer_calls(pipe.text_encoder) as te_calls:
        fused = _latents(pipe)
    _check_fused_calls(calls)
    _check_fused_calls(te_calls)
    # The text encoder and two UNet steps carry each layer's 16-bit rounding far (see MODEL_TOL), further with a
    # LoRA this strong: the fused pipeline keeps the LoRA's effect, the calls above are each exact to rounding.
    assert rel_err(fused, styled) < rel_err(styled, base) / 2
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    _assert_same_tensors(_tensors(pipe.unet), unet_t)
    _assert_same_tensors(_tensors(pipe.text_encoder), te_t)
    assert torch.equal(_latents(pipe), styled)
    pipe.unload_lora_weights()
    assert torch.equal(_latents(pipe), base)


def test_kohya_format_loads_through_diffusers_converter(sd_pipe_dir):
    """A kohya / A1111 file (lora_unet_… / lora_te_… with .alpha) goes through diffusers' converter: scale
    alpha / r, the same layers wrapped as for the diffusers-format file."""
    from safetensors.torch import load_file

    sd = load_file(sd_pipe_dir / "lora" / "pytorch_lora_weights.safetensors")
    pipe = _sd_quantized(sd_pipe_dir)
    with _peft_gate_lifted():
        pipe.load_lora_weights(_kohya(sd, alpha=2.0), adapter_name="kohya")
    wrapped = [m for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()] if isinstance(m, SVDQuantLoraLinear)]
    assert len(wrapped) >= 10 and all(m.scaling["kohya"] == pytest.approx(2.0 / 4) for m in wrapped)
    with _layer_calls(pipe.unet) as calls:
        _latents(pipe)
    _check_calls(calls)


# -------------------------------------------------------------------------------------- bad LoRA files


def test_wrong_shapes_name_layer_and_both_shapes_and_leave_the_model_as_it_was(quantized_dirs):
    model = _load(quantized_dirs, "flux")
    base = _out(model, "flux")
    name = _quantized_names(model)[0]
    sd = _lora(model, [name])
    sd[f"{name}.lora_A.weight"] = sd[f"{name}.lora_A.weight"][:, :96].contiguous()
    with pytest.raises(RuntimeError, match=rf"size mismatch for {name}\.lora_A\.bad\.weight.*\[4, 96\].*\[4, 128\]"):
        model.load_lora_adapter(sd, adapter_name="bad", prefix=None)
    assert not any(isinstance(m, SVDQuantLoraLinear) and m.lora_A for m in model.modules())
    assert torch.equal(_out(model, "flux"), base)


def test_unknown_layer_names(quantized_dirs, caplog):
    """No layer known: peft's error names the layers. Some unknown: diffusers logs them and loads the rest."""
    model = _load(quantized_dirs, "flux")
    name = _quantized_names(model)[0]
    extra = {k.replace(name, "blocks.9.nope"): v for k, v in _lora(model, [name]).items()}
    with pytest.raises(ValueError, match=r"Target modules \{'blocks\.9\.nope'\} not found in the base model"):
        model.load_lora_adapter(extra, adapter_name="x", prefix=None)
    # diffusers' library logger does not propagate to the root logger (where caplog listens) unless asked.
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model.load_lora_adapter(_lora(model, [name]) | extra, adapter_name="y", prefix=None)
    finally:
        diffusers.utils.logging.disable_propagation()
    assert "blocks.9.nope.lora_A.weight" in caplog.text
    assert isinstance(model.get_submodule(name), SVDQuantLoraLinear)


def test_a_16bit_layer_keeps_plain_peft(quantized_dirs):
    """Layers kept 16-bit (FLUX's proj_out, embedders) get PEFT's own Linear: the LoRA works unfused and fused;
    their fuse / unfuse is PEFT's (weight ± ΔW in the model dtype, so restored to that rounding, not bit for bit)."""
    model = _load(quantized_dirs, "flux")
    layers = ["proj_out", _quantized_names(model)[0]]
    sd = _lora(model, layers[1:])
    g = torch.Generator().manual_seed(3)
    sd["proj_out.lora_A.weight"] = (torch.randn(4, model.proj_out.in_features, generator=g) * 0.1).to(DTYPE)
    sd["proj_out.lora_B.weight"] = (torch.randn(model.proj_out.out_features, 4, generator=g) * 0.1).to(DTYPE)
    model.load_lora_adapter(sd, adapter_name="x", prefix=None)
    assert type(model.proj_out) is peft.tuners.lora.Linear
    unfused = _out(model, "flux")
    model.fuse_lora()
    assert rel_err(_out(model, "flux"), unfused) < 2 * EPS
    model.unfuse_lora()
    assert rel_err(_out(model, "flux"), unfused) < EPS


def test_variants_and_bad_values_are_refused_by_name(quantized_dirs):
    model = _load(quantized_dirs, "flux")
    name = _quantized_names(model)[0]
    shape = rf"\[{model.get_submodule(name).out_features}, 128\]"  # the first quantized layer: FLUX's AdaLN, W4A16
    with pytest.raises(ValueError, match=rf"W4A16Linear '{name}' {shape} takes plain LoRA only"):
        model.add_adapter(LoraConfig(r=4, target_modules=[name], use_dora=True), adapter_name="dora")
    model = _load(quantized_dirs, "flux")
    tensors = _tensors(model)
    sd = _lora(model, [name])
    sd[f"{name}.lora_B.weight"][0, 0] = float("nan")
    model.load_lora_adapter(sd, adapter_name="nan", prefix=None)
    with pytest.raises(ValueError, match=rf"fusing this LoRA into a W4A16Linear {shape}"):
        model.fuse_lora()
    model.unload_lora()
    _assert_same_tensors(_tensors(model), tensors)


# ------------------------------------------------------------------------------------ save and reload


def test_fused_model_saves_and_reloads_with_mixed_ranks(quantized_dirs, tmp_path):
    model = _load(quantized_dirs, "flux")
    targets = _quantized_names(model)
    model.load_lora_adapter(_lora(model, targets[:3], r=4, seed=5), adapter_name="a", prefix=None)
    model.load_lora_adapter(_lora(model, targets[2:6], r=16, seed=6), adapter_name="b", prefix=None)
    model.set_adapters(["a", "b"], weights=[1.0, 0.7])
    model.fuse_lora()
    model.unload_lora()  # keeps what was fused (diffusers' documented fuse -> unload -> save)
    fused = _out(model, "flux")
    ranks = {n: model.get_submodule(n).rank for n in targets}
    assert sorted(set(ranks.values())) == [8, 12, 24, 28]
    model.save_pretrained(tmp_path / "fused")
    reloaded = TINY_MODELS["flux"].cls.from_pretrained(tmp_path / "fused")
    assert {n: reloaded.get_submodule(n).rank for n in targets} == ranks
    assert torch.equal(_out(reloaded, "flux"), fused)


# ------------------------------------------------------------------------------------- training, compile


def test_qlora_training_lowers_the_loss_and_only_lora_parameters_get_gradients(quantized_dirs):
    model = _load(quantized_dirs, "flux")
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]))
    inputs = TINY_MODELS["flux"].inputs(DTYPE)
    out = run(model, inputs)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DTYPE)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(
        "lora_" in n and ".base_layer." not in n for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(**inputs, return_dict=False)[0].float(), target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.99 and all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert model.hf_quantizer.is_trainable


def test_unfused_loras_compile_fullgraph(quantized_dirs):
    torch._dynamo.reset()
    model = _load(quantized_dirs, "flux")
    targets = _quantized_names(model)
    model.load_lora_adapter(_lora(model, targets), adapter_name="a", prefix=None)
    model.load_lora_adapter(_lora(model, targets[::3], seed=4), adapter_name="b", prefix=None)
    model.set_adapters(["a", "b"], weights=[0.8, 0.5])
    want = _out(model, "flux")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = run(compiled, TINY_MODELS["flux"].inputs(DTYPE))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_integration_installs_when_peft_is_first_imported():
    """Importing the package does not import peft (0.5 s, and transformers' model code); the first import of peft's
    LoRA package, by any entry point, installs the integration. Run in a fresh process: this one imported peft."""
    code = (
        "import sys, torch\n"
        "import diffusers_svdquant\n"
        "assert 'peft' not in sys.modules\n"
        "from peft import LoraConfig, inject_adapter_in_model\n"
        "from diffusers_svdquant import SVDQuantLinear\n"
        "model = torch.nn.Sequential(SVDQuantLinear.from_linear(torch.nn.Linear(64, 32), 4))\n"
        "inject_adapter_in_model(LoraConfig(r=2, target_modules=['0']), model)\n"
        "assert type(model[0]).__name__ == 'SVDQuantLoraLinear', type(model[0])\n"
        "assert diffusers_svdquant.PEFT_IMPORT_ERROR is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
