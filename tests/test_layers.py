"""The checks the loaders share (integrations/layers.py): configs, calibration and checkpoints that do not fit
the model are refused with one line that names the setting, layer, file or tensor."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from models import TINY_MODELS, run
from safetensors.torch import load_file, save_file

from diffusers_svdquant import CalibrationStats, SVDQuantConfig, SVDQuantLinear, calibrate, quantize_

WEIGHTS = "diffusion_pytorch_model.safetensors"
FLUX, SD3 = TINY_MODELS["flux"], TINY_MODELS["sd3"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny FLUX and SD3 models saved in bfloat16, and FLUX statistics (no search: only the absmax)."""
    dirs = {}
    for tiny in (FLUX, SD3):
        torch.manual_seed(0)
        dirs[tiny.name] = tmp_path_factory.mktemp(tiny.name)
        tiny.build().to(torch.bfloat16).save_pretrained(dirs[tiny.name])
    model = FLUX.cls.from_pretrained(dirs["flux"], dtype=torch.bfloat16)
    dirs["stats"] = tmp_path_factory.mktemp("stats") / "flux.safetensors"
    calibrate(model, run=lambda m: run(m, FLUX.inputs(torch.bfloat16)), search=False, progress=False).save(
        dirs["stats"]
    )
    return dirs


def _load(tiny, path, **config):
    return tiny.cls.from_pretrained(path, dtype=torch.bfloat16, quantization_config=SVDQuantConfig(**config))


def _quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}


def test_substring_pattern_keeps_every_matching_layer_16bit(saved):
    """modules_to_not_convert=["to_q"] means every *.to_q, as in bitsandbytes / quanto / torchao."""
    model = _load(FLUX, saved["flux"], rank=8, modules_to_not_convert=["to_q"])
    to_q = [n for n, _ in model.named_modules() if n.endswith(".to_q")]
    assert len(to_q) >= 2 and not _quantized_names(model) & set(to_q)
    assert any(n.endswith(".to_k") for n in _quantized_names(model))


def test_pattern_that_matches_nothing_is_named_in_a_warning(saved):
    with pytest.warns(UserWarning, match=r"pattern 'to_qq' matches no module of FluxTransformer2DModel"):
        _load(FLUX, saved["flux"], rank=8, modules_to_not_convert=["to_qq", "to_k"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _load(FLUX, saved["flux"], rank=8)  # the built-in defaults never warn


def test_statistics_of_another_model_are_refused(saved):
    with pytest.raises(ValueError, match=r"made from FluxTransformer2DModel, not SD3Transformer2DModel"):
        _load(SD3, saved["sd3"], rank=8, calibration=saved["stats"])
    stats = CalibrationStats.load(saved["stats"])
    stats.act_absmax = {f"other.{k}": v for k, v in stats.act_absmax.items()}
    with pytest.raises(ValueError, match=r"cover none of the \d+ quantized layers of FluxTransformer2DModel"):
        _load(FLUX, saved["flux"], rank=8, calibration=stats)


def test_calibration_stats_repr_is_one_line(saved):
    text = repr(CalibrationStats.load(saved["stats"]))
    assert "\n" not in text and len(text) < 200 and "from FluxTransformer2DModel" in text


def test_statistics_covering_some_layers_warn_with_the_counts(saved):
    stats = CalibrationStats.load(saved["stats"])
    dropped = [n for n in sorted(stats.act_absmax) if ".attn.to_" in n][:3]
    for name in dropped:
        del stats.act_absmax[name]
    with pytest.warns(UserWarning, match=r"cover (\d+) of the (\d+) quantized layers.*the other 3 \(e.g. '") as w:
        model = _load(FLUX, saved["flux"], rank=8, calibration=stats)
    covered, total = (int(v) for v in str(w[0].message).split("cover ")[1].split(" quantized")[0].split(" of the "))
    assert total == len(_quantized_names(model)) and covered == total - 3
    assert set(dropped) <= _quantized_names(model)


def test_statistics_of_another_width_are_refused(saved):
    stats = CalibrationStats.load(saved["stats"])
    name = next(n for n in sorted(stats.act_absmax) if ".attn.to_" in n)
    stats.act_absmax[name] = torch.ones(stats.act_absmax[name].numel() + 64)
    with pytest.raises(ValueError, match=rf"statistics for layer '{name}' have shape \[\d+\].*takes \d+ input"):
        _load(FLUX, saved["flux"], rank=8, calibration=stats)


def _saved_quantized(saved, tmp_path, rank=8):
    out = tmp_path / "q"
    _load(FLUX, saved["flux"], rank=rank).save_pretrained(out)
    return out


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_nan_scales_are_refused_at_load(saved, tmp_path):
    out = _saved_quantized(saved, tmp_path)
    tensors = load_file(out / WEIGHTS)
    name = next(k for k in sorted(tensors) if k.endswith(".wscales"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    layer = name.removesuffix(".wscales")
    with pytest.raises(ValueError, match=rf"layer '{layer}' holds NaN or infinite values in wscales"):
        FLUX.cls.from_pretrained(out)


def test_format_version_must_be_an_integer(saved, tmp_path):
    out = _saved_quantized(saved, tmp_path)
    _edit_config(out, format_version="1")
    with pytest.raises(ValueError, match=r"format_version must be an integer >= 1, got '1' \(str\)"):
        FLUX.cls.from_pretrained(out)


def test_rank_is_read_from_the_tensors_not_the_config(saved, tmp_path):
    """A layer's rank is its lora_down's width (a fused LoRA widens some layers): a config rank that differs loads."""
    out = _saved_quantized(saved, tmp_path, rank=8)
    _edit_config(out, rank=16)
    model = FLUX.cls.from_pretrained(out)
    assert {m.rank for m in model.modules() if isinstance(m, SVDQuantLinear)} == {8}


def test_tensors_that_disagree_with_each_other_name_layer_and_shapes(saved, tmp_path):
    out = _saved_quantized(saved, tmp_path, rank=8)
    tensors = load_file(out / WEIGHTS)
    name = next(k for k in sorted(tensors) if k.endswith(".lora_up"))
    tensors[name] = tensors[name][:, :6].contiguous()
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        FLUX.cls.from_pretrained(out)
    msg = str(e.value)
    assert f"{name} has shape [" in msg and ", 6], but layer" in msg and "rank 8 from its lora_down) needs [" in msg
    assert "ignore_mismatched_sizes" in msg and "random weights" in msg  # named as the trap it is, not suggested


def test_quantize_twice_with_another_config_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64))
    quantize_(model, SVDQuantConfig(rank=16))
    with pytest.raises(ValueError, match=r"already quantized \(2 SVDQuantLinear layers, rank 16\)"):
        quantize_(model, SVDQuantConfig(rank=8))
    quantize_(model, SVDQuantConfig(rank=16))  # the same config again: nothing left to do, no error


class _KeepToQ(FLUX.cls):
    """A FLUX model whose class keeps every attention's to_q in float32 (as some diffusers models keep norms)."""

    _keep_in_fp32_modules = ["to_q"]


def test_keep_in_fp32_modules_are_matched_at_any_depth_and_version1_keeps_its_selection(saved, tmp_path):
    model = _KeepToQ.from_pretrained(saved["flux"], dtype=torch.bfloat16, quantization_config=SVDQuantConfig(rank=8))
    to_q = {n for n, _ in model.named_modules() if n.endswith(".to_q")}
    assert to_q and not to_q & _quantized_names(model)
    # A version-1 config matched the class's names at the top level only: its to_q layers were quantized, and a
    # checkpoint saved that way reloads with the same layers.
    old = _KeepToQ.from_pretrained(
        saved["flux"], dtype=torch.bfloat16, quantization_config=SVDQuantConfig(rank=8, format_version=1)
    )
    assert to_q <= _quantized_names(old)
    old.save_pretrained(tmp_path / "v1")
    assert _quantized_names(_KeepToQ.from_pretrained(tmp_path / "v1")) == _quantized_names(old)


def test_checkpoint_of_the_other_kind_names_the_layer(saved, tmp_path):
    """A checkpoint whose tensors are W4A16 where its config's rule says W4A4 (or the reverse) fails loudly,
    naming the layer, instead of loading a layer of the wrong kind."""
    out = _saved_quantized(saved, tmp_path)  # default: the AdaLN linears are W4A16
    _edit_config(out, weight_only_modules=[])
    with pytest.raises(ValueError, match=r"layer 'transformer_blocks\.0\.norm1\.linear' holds weight-only \(W4A16\)"):
        FLUX.cls.from_pretrained(out)
    _edit_config(out, weight_only_modules=["*"])
    with pytest.raises(ValueError, match=r"missing transformer_blocks\.0\.attn\.\w+\.wmins .*W4A4 tensors"):
        FLUX.cls.from_pretrained(out)


def test_quantize_makes_each_layer_its_kind():
    """``quantize_`` on a model in memory follows ``weight_only_modules`` layer by layer."""
    from diffusers_svdquant import W4A16Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    quantize_(model, SVDQuantConfig(rank=4, weight_only_modules=["^1"], modules_to_not_convert=[]))
    assert type(model[0]) is SVDQuantLinear and type(model[1]) is W4A16Linear
