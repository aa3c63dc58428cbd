"""What the loaders read from checkpoint files before the weights (integrations/checkpoint_files.py): the
safetensors headers, and the background NaN / inf scan of the quantized layers' float tensors."""

from __future__ import annotations

import pytest
import torch
from models import TINY_MODELS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_svdquant import SVDQuantConfig
from diffusers_svdquant.integrations import checkpoint_files
from diffusers_svdquant.integrations.checkpoint_files import FiniteCheck, checkpoint_shapes, read_headers

FLUX = TINY_MODELS["flux"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.b.wscales": torch.randn(6, 2, dtype=torch.bfloat16),
        "a.b.lora_up": torch.randn(6, 3, dtype=torch.float16),
        "a.b.smooth": torch.rand(128),
        "a.b.qweight": torch.randint(0, 255, (6, 64), dtype=torch.uint8),
        "c.wscales": torch.randn(5, dtype=torch.bfloat16),
        "other.weight": torch.randn(4, 4, dtype=torch.bfloat16),
    }


def test_headers_give_the_shapes_and_bytes_safetensors_holds(tmp_path):
    tensors = _tensors()
    files = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    save_file(dict(list(tensors.items())[:3]), files[0], metadata={"format": "pt"})
    save_file(dict(list(tensors.items())[3:]), files[1])
    headers = read_headers(files)
    assert checkpoint_shapes(headers) == {name: tuple(t.shape) for name, t in tensors.items()}
    for f in files:
        raw = f.read_bytes()
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                e = headers[str(f)][name]
                assert raw[e.begin : e.end] == tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
    assert read_headers([tmp_path / "model.bin"]) is None and read_headers(None) is None


@pytest.mark.parametrize("damage", ["truncated", "not json", "no offsets"])
def test_damaged_header_is_refused_naming_the_file(tmp_path, damage):
    f = tmp_path / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(b"\x10\x00")
    elif damage == "not json":
        f.write_bytes((5).to_bytes(8, "little") + b"{nope")
    else:
        f.write_bytes((25).to_bytes(8, "little") + b'{"a": {"dtype": "F32"}}  ')
    with pytest.raises(ValueError, match=rf"cannot read the safetensors header of {f}"):
        read_headers([f])


def test_finite_check_reads_only_the_quantized_layers_float_tensors(tmp_path):
    tensors = _tensors()
    tensors["a.b.wscales"][3, 1] = float("nan")
    tensors["a.b.lora_up"][0, 0] = float("-inf")
    tensors["other.weight"][0, 0] = float("nan")  # not a quantized layer's: never read
    f = tmp_path / "m.safetensors"
    save_file(tensors, f)
    check = FiniteCheck(read_headers([f]), {"a.b", "c"})
    assert check.covered == {
        "a.b.wscales": torch.bfloat16, "a.b.lora_up": torch.float16, "a.b.smooth": torch.float32,
        "c.wscales": torch.bfloat16,
    }  # fmt: skip
    assert check.bad() == {"a.b.wscales", "a.b.lora_up"}
    assert FiniteCheck(read_headers([f]), {"c"}).bad() == set()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny FLUX quantized in bfloat16 and saved."""
    torch.manual_seed(0)
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("q")
    FLUX.build().to(torch.bfloat16).save_pretrained(src)
    config = SVDQuantConfig(rank=8)
    FLUX.cls.from_pretrained(src, dtype=torch.bfloat16, quantization_config=config).save_pretrained(out)
    return out


def _damaged(quantized, tmp_path, suffix, value):
    tensors = load_file(quantized / WEIGHTS)
    names = sorted(k for k in tensors if k.endswith(suffix))
    tensors[names[-1]].view(-1)[-1] = value
    out = tmp_path / "damaged"
    out.mkdir()
    (out / "config.json").write_bytes((quantized / "config.json").read_bytes())
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out, names[-1].rpartition(".")[0]


@pytest.mark.parametrize(("suffix", "value"), [(".wscales", float("nan")), (".lora_down", float("inf"))])
def test_damaged_checkpoint_is_refused_by_the_background_scan(quantized, tmp_path, monkeypatch, suffix, value):
    out, layer = _damaged(quantized, tmp_path, suffix, value)
    scanned = []
    monkeypatch.setattr(checkpoint_files.ops, "first_nonfinite", lambda ts: scanned.extend(ts) or -1)
    tensor = suffix.lstrip(".")
    with pytest.raises(ValueError, match=rf"layer '{layer}' holds NaN or infinite values in {tensor}: the checkpoint"):
        FLUX.cls.from_pretrained(out)
    assert scanned == []  # the file scan covered every tensor: nothing was scanned again in the foreground
    FLUX.cls.from_pretrained(quantized)  # an intact checkpoint loads


def test_values_that_overflow_on_the_way_in_are_scanned_in_the_foreground(quantized, tmp_path):
    """1e5 is finite in the file's bfloat16 but infinite once the loader casts it to float16."""
    out, layer = _damaged(quantized, tmp_path, ".lora_up", 1e5)
    FLUX.cls.from_pretrained(out)  # as saved: finite
    with pytest.raises(ValueError, match=rf"layer '{layer}' holds NaN or infinite values in lora_up"):
        FLUX.cls.from_pretrained(out, dtype=torch.float16)
