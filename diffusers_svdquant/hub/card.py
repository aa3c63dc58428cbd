"""The model card of a quantized checkpoint, its size figures, and :func:`save_quantized` (save + card)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import (
    ModelCard,
    ModelCardData,
)
from torch import nn

from ..config import SVDQuantConfig
from ..filemodes import as_new_files
from ..integrations.peft import fused_loras as layer_fused_loras
from ..linear import SVDQuantLinear, W4A16Linear
from .checksums import write_checksums

DEFAULT_TAGS = ("svdquant", "4-bit", "w4a4", "int4", "quantized", "diffusers")


def _modules(obj: Any) -> dict[str, nn.Module]:
    """The ``nn.Module`` s of a model ("" -> model) or of a pipeline (component name -> module)."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return {k: v for k, v in components.items() if isinstance(v, nn.Module)}
    raise TypeError(f"expected a diffusers model or pipeline, got {type(obj).__name__}")


def weight_sizes(obj: Any) -> tuple[int, int]:
    """``(bytes_16bit, bytes_quantized)`` of a model's or a pipeline's state dicts.

    ``bytes_quantized`` counts the tensors ``save_pretrained`` writes. ``bytes_16bit`` counts the same model with
    every :class:`SVDQuantLinear` as the dense ``[N, K]`` weight (+ bias) in its model dtype, i.e. the 16-bit
    checkpoint it came from.
    """
    dense = quant = 0
    for module in _modules(obj).values():
        for t in module.state_dict().values():
            quant += t.numel() * t.element_size()
        for m in module.modules():
            if isinstance(m, SVDQuantLinear):
                own = sum(t.numel() * t.element_size() for t in m.state_dict().values())
                elt = m.wscales.element_size()
                dense += m.out_features * m.in_features * elt + (m.out_features * elt if m.bias is not None else 0)
                dense -= own
        dense += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return dense, quant


def _quant_config(module: nn.Module) -> dict | None:
    qc = getattr(getattr(module, "config", None), "quantization_config", None)
    if isinstance(qc, SVDQuantConfig):
        return qc.to_dict()
    if isinstance(qc, dict) and qc.get("quant_method") == "svdquant":
        return dict(qc)
    return None


def fused_lora_summary(obj: Any) -> list[dict[str, Any]]:
    """The LoRAs fused into a model's (or pipeline's) SVDQuant layers, from the layers' records (``fuse_lora``):
    ``[{"name": adapter, "layers": how many layers, "rank": the widest it made a branch}]``, in fusion order."""
    out: dict[str, dict[str, Any]] = {}
    for module in _modules(obj).values():
        for m in module.modules():
            if isinstance(m, SVDQuantLinear):
                for name, r in layer_fused_loras(m):
                    entry = out.setdefault(name, {"name": name, "layers": 0, "rank": 0})
                    entry["layers"] += 1
                    entry["rank"] = max(entry["rank"], r)
    return list(out.values())


def _widened_layers(modules: dict[str, nn.Module]) -> int:
    """How many SVDQuant layers have a wider branch than their model's config rank (fused LoRAs, recorded or not)."""
    count = 0
    for module in modules.values():
        qc = _quant_config(module)
        if qc is not None:
            count += sum(isinstance(m, SVDQuantLinear) and m.rank > qc["rank"] for m in module.modules())
    return count


def _lora_section(loras: list[dict[str, Any]], widened: int) -> list[str]:
    if not loras and not widened:
        return []
    body = ["## Fused LoRAs", ""]
    if loras:
        body += ["| LoRA | layers | rank |", "|---|---|---|"]
        body += [f"| `{e['name']}` | {e['layers']} | {e['rank']} |" for e in loras]
        body.append("")
    body += [
        f"Fused into the low-rank branch (`fuse_lora`): {widened} layers carry a branch wider than the config's "
        "`rank`; each layer's rank is read from its tensors at load."
        + ("" if loras else " The LoRAs' names were not recorded (the model was saved without its card)."),
        "",
    ]
    return body


def load_snippet(repo_id: str, class_name: str, subfolder: str | None = None, pipeline: bool = False) -> str:
    """The Python that loads ``repo_id`` (used verbatim in the model card)."""
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    loader = "DiffusionPipeline" if pipeline else class_name
    lines = [
        "import torch",
        'import diffusers_svdquant  # registers quant_method "svdquant" with diffusers and transformers',
        f"from diffusers import {loader}",
        "",
        f'{"pipe" if pipeline else "model"} = {loader}.from_pretrained("{repo_id}"{sub})',
    ]
    return "\n".join(lines)


def model_card(
    obj: Any,
    repo_id: str,
    *,
    base_model: str | None = None,
    subfolder: str | None = None,
    quality: dict[str, Any] | None = None,
    checkpoint_bytes: int | None = None,
    calibration: str | None = None,
    extra_tags: tuple[str, ...] | list[str] = (),
    fused_loras: list[dict[str, Any]] | None = None,
) -> ModelCard:
    """A model card for a quantized model or pipeline, built with ``ModelCardData`` (metadata) + markdown.

    Args:
        obj: the quantized diffusers model or pipeline.
        repo_id: the repo (or folder) the load snippet loads from.
        base_model: the Hub repo it was quantized from (card metadata ``base_model``).
        subfolder: where the model sits in the repo (pipeline-style repos: ``"transformer"``).
        quality: measured figures (name -> value), e.g. ``{"relative error vs bf16": 0.004}``; omitted when None.
        checkpoint_bytes: total size of the saved weight files, when known.
        calibration: what the smoothing statistics were (e.g. the statistics file's name); None: not calibrated.
        extra_tags: tags beside :data:`DEFAULT_TAGS`.
        fused_loras: the LoRAs fused into the model (:func:`fused_lora_summary`'s entries); default: read from the
            layers, which know them until the model is saved and reloaded.
    """
    modules = _modules(obj)
    loras = fused_lora_summary(obj) if fused_loras is None else fused_loras
    quantized = {name: qc for name, m in modules.items() if (qc := _quant_config(m)) is not None}
    if not quantized:
        raise ValueError(f"{type(obj).__name__} has no SVDQuant-quantized model: nothing to describe as svdquant")
    pipeline = not isinstance(obj, nn.Module)
    class_name = type(obj).__name__
    dense, quant = weight_sizes(obj)
    layers = sum(isinstance(m, SVDQuantLinear) for mod in modules.values() for m in mod.modules())
    weight_only = sum(isinstance(m, W4A16Linear) for mod in modules.values() for m in mod.modules())

    meta: dict[str, Any] = {
        "config": next(iter(quantized.values())) if len(quantized) == 1 else quantized,
        "quantized_layers": layers,
        "weight_only_layers": weight_only,
        "calibration": calibration,
        "bytes_16bit": dense,
        "bytes_quantized": quant,
    }
    if checkpoint_bytes is not None:
        meta["checkpoint_bytes"] = checkpoint_bytes
    if quality:
        meta["quality"] = dict(quality)
    if loras:
        meta["fused_loras"] = loras
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image" if pipeline else None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(["w4a16"] if weight_only else []), *extra_tags])),
        svdquant=meta,
    )

    title = repo_id.rstrip("/").split("/")[-1]
    where = f" (`{subfolder}/`)" if subfolder else ""
    body = [
        f"# {title}",
        "",
        f"SVDQuant ([arXiv 2411.05007](https://arxiv.org/abs/2411.05007)) {class_name}{where}"
        + (f", quantized from [`{base_model}`](https://huggingface.co/{base_model})" if base_model else "")
        + ": the linear layers' weights and activations are INT4 in groups of 64 along the input (W4A4), with a "
        "16-bit low-rank branch absorbing the outliers; the layers `weight_only_modules` names keep 16-bit "
        "activations and 4-bit weights (W4A16). Made with diffusers-svdquant; one checkpoint runs on x86 "
        "CPUs and NVIDIA GPUs.",
        "",
        "## Load",
        "",
        "```python",
        load_snippet(repo_id, class_name, subfolder, pipeline),
        "```",
        "",
        "Without `import diffusers_svdquant` diffusers answers `Unknown quantization type, got svdquant`.",
        "",
        "## Quantization config",
        "",
    ]
    for name, qc in quantized.items():
        if name:
            body += [f"`{name}`:", ""]
        body += ["| setting | value |", "|---|---|"]
        body += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in qc.items()]
        body.append("")
    body += [
        f"Calibration: activation statistics `{calibration}`."
        if calibration
        else "Calibration: none (no smoothing, λ = 1: low-rank branch + W4A4 only).",
        "",
        "## Size",
        "",
        "| | bytes |",
        "|---|---|",
        f"| 16-bit weights (before) | {dense:,} |",
        f"| SVDQuant weights (after) | {quant:,} |",
    ]
    if checkpoint_bytes is not None:
        body.append(f"| checkpoint files | {checkpoint_bytes:,} |")
    body += [
        "",
        f"{dense / max(quant, 1):.2f}x smaller; {layers} linear layers quantized ({layers - weight_only} W4A4, "
        f"{weight_only} weight-only W4A16).",
        "",
    ]
    body += _lora_section(loras, _widened_layers(modules))
    if quality:
        body += ["## Quality", "", "| measure | value |", "|---|---|"]
        body += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in quality.items()]
        body.append("")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


def save_quantized(
    obj: Any,
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    subfolder: str | None = None,
    quality: dict[str, Any] | None = None,
    calibration: str | None = None,
    max_shard_size: int | str | None = None,
    fused_loras: list[dict[str, Any]] | None = None,
) -> Path:
    """Save a quantized model or pipeline in the canonical format with a generated ``README.md`` model card
    and ``svdquant_checksums.json`` (every tensor's CRC-32, for :func:`~.checksums.verify_checksums`).

    Args:
        obj: a model quantized with :class:`SVDQuantConfig` (or a pipeline holding one).
        save_directory: the folder to write (the repo root).
        repo_id: what the card's load snippet loads (default: ``save_directory``).
        base_model: the Hub repo the model was quantized from.
        subfolder: write a model under ``save_directory/subfolder`` (pipeline-style layout); the card stays at the
            root and its snippet passes ``subfolder=``.
        quality: measured quality figures for the card.
        calibration: the card's note on the smoothing statistics used (None: not calibrated).
        max_shard_size: shard the weights (e.g. ``"5GB"`` or bytes); diffusers writes an index file.
        fused_loras: the card's fused-LoRA list (default: read from the layers, see :func:`model_card`).

    Returns:
        ``save_directory`` as a ``Path``.
    """
    root = Path(save_directory)
    if subfolder and not isinstance(obj, nn.Module):
        raise ValueError("subfolder= applies to a single model; a pipeline is saved with its own layout")
    target = root / subfolder if subfolder else root
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    obj.save_pretrained(target, **kwargs)
    as_new_files(_weight_files(target))
    ckpt = sum(p.stat().st_size for p in _weight_files(root))
    card = model_card(
        obj,
        repo_id or str(root),
        base_model=base_model,
        subfolder=subfolder,
        quality=quality,
        checkpoint_bytes=ckpt,
        calibration=calibration,
        fused_loras=fused_loras,
    )
    card.save(root / "README.md")
    write_checksums(root)
    return root
