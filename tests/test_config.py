"""``SVDQuantConfig``: defaults, serialization as diffusers does it, validation, module exclusion."""

from __future__ import annotations

import json

import pytest
import torch

from diffusers_svdquant import (
    DEFAULT_MODULES_TO_NOT_CONVERT,
    DEFAULT_WEIGHT_ONLY_MODULES,
    SVDQuantConfig,
    SVDQuantMethod,
)
from diffusers_svdquant.config import DEFAULT_LOWRANK_ITERS, FORMAT_VERSION, component_patterns, module_matches


def test_defaults():
    """Default settings: rank 32, group 64, int4, default exclusions, α searched per layer (None), no calibration,
    svd 'auto', no refinement, no recorded dtype, current format version, quant_method 'svdquant'."""
    c = SVDQuantConfig()
    assert c.rank == 32
    assert c.group_size == 64
    assert c.precision == "int4"
    assert c.modules_to_not_convert == list(DEFAULT_MODULES_TO_NOT_CONVERT)
    assert c.smoothing_alpha is None
    assert c.calibration is None
    assert c.svd_method == "auto"
    assert c.lowrank_iters == DEFAULT_LOWRANK_ITERS == 3
    assert c.torch_dtype is None
    assert c.format_version == FORMAT_VERSION == 3
    assert c.weight_only_modules == list(DEFAULT_WEIGHT_ONLY_MODULES)
    assert c.quant_method is SVDQuantMethod.SVDQUANT
    assert isinstance(c.quant_method, str) and c.quant_method.value == "svdquant"  # diffusers reads .value


def test_default_exclusions_are_a_copy():
    """Mutating one config's exclusion list touches neither the module default nor other configs."""
    a = SVDQuantConfig()
    a.modules_to_not_convert.append("foo")
    assert "foo" not in DEFAULT_MODULES_TO_NOT_CONVERT
    assert "foo" not in SVDQuantConfig().modules_to_not_convert


SETTINGS = {
    "rank": 16,
    "modules_to_not_convert": ["proj_out", "*norm*"],
    "smoothing_alpha": 0.3,
    "svd_method": "randomized",
    "lowrank_iters": 2,
    "scale_search": False,
    "torch_dtype": "bfloat16",
}


def test_to_dict_json_and_round_trip():
    """to_dict() is JSON-serializable, carries quant_method='svdquant' (diffusers passes it back to
    the constructor through from_dict), and from_dict(to_dict()) reproduces every setting."""
    c = SVDQuantConfig(**SETTINGS)
    d = c.to_dict()
    assert d["quant_method"] == "svdquant" and type(d["quant_method"]) is str
    assert d["format_version"] == FORMAT_VERSION
    for k, v in SETTINGS.items():
        assert d[k] == v, k
    s = json.dumps(d)
    back = SVDQuantConfig.from_dict(json.loads(s))
    assert isinstance(back, SVDQuantConfig)
    assert back.to_dict() == d
    assert back.quant_method is SVDQuantMethod.SVDQUANT
    # the diffusers helpers built on to_dict / to_diff_dict work too
    assert json.loads(c.to_json_string(use_diff=False)) == d
    diff = json.loads(c.to_json_string())
    assert diff["quant_method"] == "svdquant" and diff["rank"] == 16 and "group_size" not in diff
    assert dict(c) == d


def test_quant_method_enum_or_string_accepted():
    """quant_method may come as the enum member or its string (as read from config.json)."""
    assert SVDQuantConfig(quant_method="svdquant").quant_method is SVDQuantMethod.SVDQUANT
    assert SVDQuantConfig(quant_method=SVDQuantMethod.SVDQUANT).quant_method is SVDQuantMethod.SVDQUANT


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"smoothing_alpha": "0.5"}, r"smoothing_alpha.*'0\.5'"),
        ({"smoothing_alpha": True}, r"smoothing_alpha.*True"),
        ({"rank": -1}, r"rank.*-1"),
        ({"rank": 1.5}, r"rank.*1\.5"),
        ({"rank": True}, r"rank.*True"),
        ({"rank": "32"}, r"rank.*'32'"),
        ({"group_size": 128}, r"group_size.*128"),
        ({"group_size": 32}, r"group_size.*32"),
        ({"precision": "fp4"}, r"precision.*fp4"),
        ({"smoothing_alpha": 1.5}, r"smoothing_alpha.*1\.5"),
        ({"smoothing_alpha": -0.1}, r"smoothing_alpha.*-0\.1"),
        ({"svd_method": "lanczos"}, r"svd_method.*lanczos"),
        ({"lowrank_iters": -1}, r"lowrank_iters.*-1"),
        ({"lowrank_iters": 1.5}, r"lowrank_iters.*1\.5"),
        ({"quant_method": "bitsandbytes"}, r"quant_method.*bitsandbytes"),
        ({"quant_method": "gguf"}, r"quant_method.*gguf"),
        ({"bits": 4}, r"unknown settings.*bits"),
        ({"format_version": FORMAT_VERSION + 1}, rf"format_version {FORMAT_VERSION + 1}.*newer"),
        ({"modules_to_not_convert": ["a", 3]}, r"modules_to_not_convert"),
    ],
)
def test_bad_settings(kwargs, pattern):
    """Each invalid setting → ValueError naming the setting and the bad value."""
    with pytest.raises(ValueError, match=pattern):
        SVDQuantConfig(**kwargs)


def test_bool_lowrank_iters_rejected():
    """lowrank_iters=True is rejected like rank=True (a bool is not an iteration count)."""
    with pytest.raises(ValueError, match="lowrank_iters"):
        SVDQuantConfig(lowrank_iters=True)


def test_bad_settings_from_dict():
    """from_dict (diffusers' entry point for config.json) validates too."""
    d = SVDQuantConfig().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="newer"):
        SVDQuantConfig.from_dict(d)
    d = SVDQuantConfig().to_dict()
    d["unexpected"] = 1
    with pytest.raises(ValueError, match="unexpected"):
        SVDQuantConfig.from_dict(d)


@pytest.mark.parametrize(
    "ok",
    [
        {"rank": 0},
        {"rank": 1},
        {"smoothing_alpha": None},
        {"smoothing_alpha": 0.0},
        {"smoothing_alpha": 1},
        {"format_version": 1},
    ],
)
def test_edge_settings_accepted(ok):
    """Boundary values that are valid are accepted."""
    SVDQuantConfig(**ok)


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("transformer_blocks.3.attn.to_q", ["to_q"], True),  # substring, as diffusers' other backends
        ("transformer_blocks.3.attn.to_q", ["attn.to_"], True),
        ("transformer_blocks.3.attn.to_k", ["to_q"], False),
        ("proj_out", ["^proj_out"], True),  # anchored: the top-level module...
        ("proj_out.lora", ["^proj_out"], True),  # ...and everything below it
        ("proj_outer", ["^proj_out"], False),
        ("single_transformer_blocks.0.proj_out", ["^proj_out"], False),  # not a block's own proj_out
        ("single_transformer_blocks.0.proj_out", ["proj_out"], True),
        ("transformer_blocks.3.norm1.linear", ["*norm*"], True),  # glob over the whole name
        ("transformer_blocks.3.attn.to_q", ["*norm*"], False),
        ("transformer_blocks.3.attn.to_q", ["transformer_blocks.3"], True),
        ("transformer_blocks.30.attn.to_q", ["transformer_blocks.3."], False),
        ("down_blocks.0.resnets.0.time_emb_proj", ["*time_emb_proj"], True),
        ("anything", [], False),
    ],
)
def test_module_matches(name, patterns, expected):
    """Patterns match as a substring, anchored with "^", or as a glob over the whole name."""
    assert module_matches(name, patterns) is expected
    assert SVDQuantConfig(modules_to_not_convert=patterns).is_excluded(name) is expected


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("proj_out", "proj_out", True),  # exact
        ("proj_out.lora", "proj_out", True),  # a parent
        ("single_transformer_blocks.0.proj_out", "proj_out", False),  # version 1: plain names are exact
        ("transformer_blocks.3.attn.to_q", "to_q", False),
        ("transformer_blocks.3.norm1.linear", "*norm*", True),
        ("single_transformer_blocks.0.proj_out", "^proj_out", False),
    ],
)
def test_version1_configs_keep_their_matching(name, pattern, expected):
    """A config saved with format_version 1 selects the same layers at reload as when it was saved."""
    assert module_matches(name, [pattern], format_version=1) is expected
    assert SVDQuantConfig(modules_to_not_convert=[pattern], format_version=1).is_excluded(name) is expected


def test_defaults_select_what_the_version1_defaults_selected():
    """The anchored defaults keep the top-level modules 16-bit, exactly like the version-1 defaults did, and
    make the rest of what version 1 kept (the AdaLN linears) weight-only."""
    old = [
        "x_embedder",
        "context_embedder",
        "pos_embed",
        "time_text_embed",
        "time_embed",
        "time_embedding",
        "add_embedding",
        "encoder_hid_proj",
        "caption_projection",
        "proj_in",
        "proj_out",
        "norm_out",
        "*norm*",
        "*time_emb_proj",
        "lm_head",
        # added since version 1 (as exact names / globs in that version's matching):
        "t_embedder",
        "img_in",
        "txt_in",
        "*.img_mod.*",
        "*.txt_mod.*",
        "distilled_guidance_layer",
        "*stream_modulation*",
        "time_guidance_embed",
        "condition_embedder",
    ]
    names = [
        "x_embedder", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
        "context_embedder", "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp",
        "transformer_blocks.0.norm1.linear", "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.attentions.0.proj_out", "down_blocks.0.resnets.0.time_emb_proj", "time_embedding.linear_1",
        "add_embedding.linear_2", "lm_head", "encoder.block.0.layer.0.SelfAttention.q",
        "transformer_blocks.0.attn.to_q", "caption_projection.linear_1", "pos_embed.proj", "t_embedder.mlp.0",
        "img_in", "transformer_blocks.0.img_mod.1", "double_stream_modulation_img.linear",
        "condition_embedder.time_embedder.linear_1", "transformer_blocks.0.attn.add_q_proj",
        "layers.0.t_embedder_like.linear",
    ]  # fmt: skip
    c = SVDQuantConfig()
    for name in names:
        # Since version 3 the AdaLN linears ("*norm*" in version 1) are quantized weight-only instead.
        kept_or_weight_only = c.is_excluded(name) or c.is_weight_only(name)
        assert kept_or_weight_only == module_matches(name, old, 1), name
        weight_only = c.is_weight_only(name) and not c.is_excluded(name)  # exclusion wins
        assert weight_only == (module_matches(name, ["*norm*"], 1) and not c.is_excluded(name)), name


def test_component_patterns_match_a_name_at_any_depth():
    patterns = component_patterns(["wo"])
    assert module_matches("wo", patterns) and module_matches("encoder.block.0.layer.1.DenseReluDense.wo", patterns)
    assert module_matches("encoder.wo.inner", patterns)
    assert not module_matches("encoder.block.0.layer.1.DenseReluDense.wo_extra", patterns)
    assert not module_matches("two", patterns)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules_to_not_convert": "single_transformer_blocks.0.proj_out"}, r"list.*got the string.*write \["),
        ({"format_version": "1"}, r"format_version must be an integer.*'1' \(str\)"),
        ({"format_version": 0}, r"format_version must be an integer >= 1"),
        ({"format_version": 1.0}, r"format_version must be an integer"),
    ],
)
def test_bad_types_are_refused_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVDQuantConfig(**kwargs)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("proj_out", True),
        ("single_transformer_blocks.0.proj_out", False),
        ("norm_out.linear", True),
        ("transformer_blocks.0.norm1.linear", False),  # weight-only (test_default_weight_only)
        ("x_embedder", True),
        ("time_text_embed.timestep_embedder.linear_1", True),
        ("transformer_blocks.0.attn.to_q", False),
        ("transformer_blocks.0.ff.net.2", False),
        ("single_transformer_blocks.0.proj_mlp", False),
    ],
)
def test_default_exclusions(name, expected):
    """The default list keeps FLUX's embedders, norms and top-level proj_out in 16-bit and quantizes
    the attention / MLP linears, including the single blocks' own proj_out."""
    assert SVDQuantConfig().is_excluded(name) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("transformer_blocks.0.norm1.linear", True),
        ("transformer_blocks.0.norm1_context.linear", True),
        ("single_transformer_blocks.0.norm.linear", True),
        ("transformer_blocks.0.attn.to_q", False),
        ("single_transformer_blocks.0.proj_mlp", False),
    ],
)
def test_default_weight_only(name, expected):
    """By default the AdaLN modulation linears are W4A16, the attention / MLP linears W4A4."""
    assert SVDQuantConfig().is_weight_only(name) is expected


def test_weight_only_everywhere_and_precedence():
    """``["*"]`` makes every quantized layer weight-only; ``modules_to_not_convert`` wins over it."""
    c = SVDQuantConfig(weight_only_modules=["*"])
    assert c.is_weight_only("encoder.layer.0.attention.self.query") and c.is_weight_only("to_q")
    assert c.is_excluded("norm_out.linear")  # matched first: stays 16-bit


@pytest.mark.parametrize("version", [1, 2])
def test_old_configs_have_no_weight_only_layers(version):
    """A config of format_version < 3 (a checkpoint saved before W4A16 existed) makes no layer weight-only,
    so its checkpoint reloads with the layers it was saved with; asking for some there is refused."""
    c = SVDQuantConfig.from_dict({"quant_method": "svdquant", "format_version": version})
    assert c.weight_only_modules == [] and not c.is_weight_only("transformer_blocks.0.norm1.linear")
    with pytest.raises(ValueError, match="weight_only_modules needs format_version >= 3"):
        SVDQuantConfig(weight_only_modules=["*norm*"], format_version=version)


def test_weight_only_modules_string_is_refused():
    with pytest.raises(ValueError, match=r"weight_only_modules must be a list .* write \['\*norm\*'\]"):
        SVDQuantConfig(weight_only_modules="*norm*")


def test_calibration_not_serialized(tmp_path):
    """Calibration statistics (a path or a dict of tensors) are not part of to_dict / JSON / repr."""
    stats = {"transformer_blocks.0.attn.to_q": torch.rand(128)}
    for calib in (stats, str(tmp_path / "calib.safetensors")):
        c = SVDQuantConfig(calibration=calib)
        assert c.calibration is calib
        d = c.to_dict()
        assert "calibration" not in d
        assert "calibration" not in json.loads(c.to_json_string(use_diff=False))
        assert "calibration" not in repr(c)
        c.to_json_file(tmp_path / "q.json")
        assert "calibration" not in json.loads((tmp_path / "q.json").read_text())
        assert SVDQuantConfig.from_dict(d).calibration is None
