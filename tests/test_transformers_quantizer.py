"""Through transformers: text encoders quantized on load, saved, reloaded without a config; registration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import TINY_MODELS, rel_err, run
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as hf_auto

import diffusers_svdquant
from diffusers_svdquant import SVDQuantConfig, SVDQuantLinear, calibrate, quantize_
from diffusers_svdquant.integrations.transformers_quantizer import SVDQuantHfQuantizer

WEIGHTS = "model.safetensors"
RANK = 16
# Relative error of last_hidden_state, rank-16 W4A4 vs the same model in bf16, on these random-weight
# encoders: clip 0.27, t5 0.15 (seeds 0-2: clip 0.26-0.30, t5 0.14-0.15). Random weights have no
# low-rank structure and every linear sees Gaussian inputs, so each quantized linear alone is ~12% off
# and the errors compound; test_minilm.py checks quality on real weights. Bounds: ~1.5x the worst seed.
ERROR_BOUND = {"clip": 0.45, "t5": 0.25}


def _clip() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
    )  # fmt: skip


def _t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=1000, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4))


ENCODERS = {"clip": (CLIPTextModel, _clip), "t5": (T5EncoderModel, _t5)}
INPUT_IDS = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's 2 cores are shared; OpenMP spin-waiting under oversubscription makes the SVDs
    and GEMMs 10-50x slower, so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each tiny encoder saved once in float32, as a user's 16-bit checkpoint would be."""
    dirs = {}
    for name, (_, build) in ENCODERS.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(name)
        build().save_pretrained(d)
        dirs[name] = d
    return dirs


def _hidden(model: nn.Module, ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def _quantized_layers(model: nn.Module) -> dict[str, SVDQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_quantize_on_load_save_reload(name, saved, tmp_path):
    """Quantize on load, the error bound, the canonical files, and a bit-identical reload with no config."""
    cls, _ = ENCODERS[name]
    ref = cls.from_pretrained(saved[name], dtype=torch.bfloat16)
    model = cls.from_pretrained(saved[name], dtype=torch.bfloat16, quantization_config=SVDQuantConfig(rank=RANK))

    layers = _quantized_layers(model)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if name == "clip":
        assert len(layers) == 12 and not plain  # q, k, v, out_proj, fc1, fc2 per layer
    else:
        # T5 lists `wo` in _keep_in_fp32_modules: it stays a 16-bit nn.Linear, as with diffusers models.
        assert len(layers) == 10 and plain and all(n.endswith(".wo") for n in plain)
    assert model.is_quantized and isinstance(model.hf_quantizer, SVDQuantHfQuantizer)
    assert all("weight" not in m._parameters and not any(p.requires_grad for p in m.parameters())
               for m in layers.values())  # fmt: skip
    y = _hidden(model)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    err = rel_err(y, _hidden(ref))
    assert err < ERROR_BOUND[name], err

    out = tmp_path / "q"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "svdquant" and cfg["rank"] == RANK and cfg["torch_dtype"] == "bfloat16"
    assert cfg["format_version"] == 3
    tensors = load_file(out / WEIGHTS)
    for n, m in layers.items():
        n_out, k = m.out_features, m.in_features
        assert f"{n}.weight" not in tensors
        expected = {
            "qweight": (torch.uint8, (n_out, k // 2)),
            "wscales": (torch.bfloat16, (n_out, k // 64)),
            "smooth": (torch.bfloat16, (k,)),
            "lora_down": (torch.bfloat16, (k, RANK)),
            "lora_up": (torch.bfloat16, (n_out, RANK)),
        }
        for t, (dtype, shape) in expected.items():
            assert (tensors[f"{n}.{t}"].dtype, tensors[f"{n}.{t}"].shape) == (dtype, shape), f"{n}.{t}"
        assert (f"{n}.bias" in tensors) == (m.bias is not None)

    reloaded = cls.from_pretrained(out)
    assert isinstance(reloaded.config.quantization_config, SVDQuantConfig)
    assert reloaded.dtype == torch.bfloat16
    assert _quantized_layers(reloaded).keys() == layers.keys()
    assert torch.equal(_hidden(reloaded), y)


def test_quantize_on_load_equals_quantize_in_memory_with_calibration(saved):
    """The loader path with calibration statistics and quantize_ on a loaded model agree bit for bit."""
    ref = CLIPTextModel.from_pretrained(saved["clip"])
    stats = calibrate(ref, lambda m: _hidden(m, torch.randint(3, 1000, (4, 16), generator=torch.Generator())))
    config = SVDQuantConfig(rank=8, calibration=stats)
    loaded = CLIPTextModel.from_pretrained(saved["clip"], quantization_config=config)
    in_memory = quantize_(ref, SVDQuantConfig(rank=8, calibration=stats))
    assert not torch.equal(loaded.encoder.layers[0].mlp.fc1.smooth, torch.ones(128))  # smoothing applied
    assert torch.equal(_hidden(loaded), _hidden(in_memory))


def test_one_config_object_for_transformers_and_diffusers(saved, tmp_path):
    """The same SVDQuantConfig instance quantizes a T5 encoder and a FLUX transformer."""
    config = SVDQuantConfig(rank=RANK)
    t5 = T5EncoderModel.from_pretrained(saved["t5"], quantization_config=config)
    tiny = TINY_MODELS["flux"]
    torch.manual_seed(0)
    tiny.build().save_pretrained(tmp_path / "flux")
    flux = tiny.cls.from_pretrained(tmp_path / "flux", quantization_config=config)
    assert _quantized_layers(t5) and _quantized_layers(flux)
    assert torch.isfinite(_hidden(t5)).all() and torch.isfinite(run(flux, tiny.inputs(torch.float32))).all()


def test_pipeline_quantization_config_with_svdquant_backend():
    """quant_backend="svdquant" validates (same class, so same __init__, in both libraries' mappings)."""
    from diffusers import PipelineQuantizationConfig

    pq = PipelineQuantizationConfig(
        quant_backend="svdquant",
        quant_kwargs={"rank": RANK},
        components_to_quantize=["transformer", "text_encoder_2"],
    )
    for component, is_diffusers in (("transformer", True), ("text_encoder_2", False)):
        config = pq._resolve_quant_config(is_diffusers=is_diffusers, module_name=component)
        assert isinstance(config, SVDQuantConfig) and config.rank == RANK
    assert pq._resolve_quant_config(is_diffusers=True, module_name="vae") is None


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_qweight_names_the_layer(fmt, saved, tmp_path):
    """A pre-quantized checkpoint without one layer's qweight fails naming that layer (safetensors: before
    loading, from the header; other formats: after loading, from the tensors the loader did not set)."""
    out = tmp_path / "q"
    T5EncoderModel.from_pretrained(saved["t5"], quantization_config=SVDQuantConfig(rank=RANK)).save_pretrained(out)
    layer = "encoder.block.1.layer.0.SelfAttention.k"
    tensors = load_file(out / WEIGHTS)
    del tensors[f"{layer}.qweight"]
    (out / WEIGHTS).unlink()
    if fmt == "safetensors":
        save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    else:
        torch.save(tensors, out / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"missing {layer}\.qweight for quantized layer '{layer}'"):
        T5EncoderModel.from_pretrained(out, use_safetensors=fmt == "safetensors")


def test_missing_16bit_weight_names_the_layer(saved, tmp_path):
    """Quantize on load from a checkpoint that lacks a target layer's weight fails naming the layer."""
    layer = "encoder.layers.1.mlp.fc1"
    tensors = load_file(saved["clip"] / WEIGHTS)
    del tensors[f"{layer}.weight"]
    out = tmp_path / "partial"
    out.mkdir()
    (out / "config.json").write_text((saved["clip"] / "config.json").read_text())
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"no weight for layer '{layer}'"):
        CLIPTextModel.from_pretrained(out, quantization_config=SVDQuantConfig(rank=RANK))


def test_dequantize_restores_linears(saved):
    """model.dequantize() swaps every SVDQuantLinear back to nn.Linear and drops the quantization config."""
    model = CLIPTextModel.from_pretrained(saved["clip"], quantization_config=SVDQuantConfig(rank=RANK))
    y = _hidden(model)
    model = model.dequantize()
    assert not _quantized_layers(model) and not getattr(model.config, "quantization_config", None)
    # Only activation quantization separates the two now.
    assert rel_err(_hidden(model), y) < ERROR_BOUND["clip"]


def test_registration_is_idempotent():
    diffusers_svdquant.register()
    diffusers_svdquant.register()
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["svdquant"] is SVDQuantConfig
    assert hf_auto.AUTO_QUANTIZER_MAPPING["svdquant"] is SVDQuantHfQuantizer


class _ForeignQuantizer(HfQuantizer):
    """Stands for another package's quantizer registered under the same name."""


@pytest.mark.parametrize("mapping_name", ["AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING"])
def test_foreign_registration_is_never_overwritten(mapping_name):
    mapping = getattr(hf_auto, mapping_name)
    names = ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING")
    ours = {name: getattr(hf_auto, name).pop("svdquant") for name in names}
    mapping["svdquant"] = _ForeignQuantizer
    try:
        with pytest.raises(RuntimeError, match="transformers already maps.*_ForeignQuantizer"):
            diffusers_svdquant.register()
        assert mapping["svdquant"] is _ForeignQuantizer
        # Both keys are checked before either is written.
        assert [name for name in names if "svdquant" in getattr(hf_auto, name)] == [mapping_name]
    finally:
        for name, cls in ours.items():
            getattr(hf_auto, name)["svdquant"] = cls


def test_register_without_transformers():
    """With transformers unimportable, importing the package still registers with diffusers."""
    init = Path(diffusers_svdquant.__file__)
    code = (
        "import importlib.util, sys\n"
        "sys.modules['transformers'] = None\n"
        # Import the package under test by location, whatever else an installed finder would pick.
        f"spec = importlib.util.spec_from_file_location('diffusers_svdquant', {str(init)!r},\n"
        f"    submodule_search_locations=[{str(init.parent)!r}])\n"
        "package = sys.modules['diffusers_svdquant'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(package)\n"
        "from diffusers.quantizers import auto\n"
        "package.register()\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['svdquant'] is package.SVDQuantDiffusersQuantizer\n"
        "from diffusers_svdquant.integrations import transformers_quantizer\n"
        "assert isinstance(transformers_quantizer.TRANSFORMERS_IMPORT_ERROR, ImportError)\n"
        # peft (which imports transformers) is not imported until a LoRA is: quantization does not need it.
        "assert 'peft' not in sys.modules and package.PEFT_IMPORT_ERROR is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_weight_only_encoder_save_reload(name, saved, tmp_path):
    """``weight_only_modules=["*"]`` makes every quantized linear of a text encoder W4A16: ``wmins`` in the
    files, an error below the W4A4 one, and a bit-identical reload without a config, layer kinds kept."""
    from diffusers_svdquant import W4A16Linear

    cls, _ = ENCODERS[name]
    ref = _hidden(cls.from_pretrained(saved[name], dtype=torch.bfloat16))
    config = SVDQuantConfig(rank=RANK, weight_only_modules=["*"])
    model = cls.from_pretrained(saved[name], dtype=torch.bfloat16, quantization_config=config)
    layers = _quantized_layers(model)
    assert layers and all(type(m) is W4A16Linear for m in layers.values())
    y = _hidden(model)
    w4a4 = _hidden(
        cls.from_pretrained(saved[name], dtype=torch.bfloat16, quantization_config=SVDQuantConfig(rank=RANK))
    )
    assert rel_err(y, ref) < rel_err(w4a4, ref)
    out = tmp_path / "q"
    model.save_pretrained(out)
    tensors = load_file(out / WEIGHTS)
    for n, m in layers.items():
        assert tensors[f"{n}.wmins"].shape == (m.out_features, m.in_features // 64)
    reloaded = cls.from_pretrained(out)
    assert {n: type(m) for n, m in _quantized_layers(reloaded).items()} == {n: W4A16Linear for n in layers}
    assert torch.equal(_hidden(reloaded), y)
