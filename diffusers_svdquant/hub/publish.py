"""Quantize a 16-bit model on load, save it with a card, and push it: the whole publishing flow."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    hf_hub_download,
)

from ..config import DEFAULT_RANK, SVDQuantConfig
from ..denoisers import denoiser_quality
from ..dtypes import parse_dtype
from .card import save_quantized
from .upload import PushResult, push


def source_fused_loras(source: str | os.PathLike, token: str | None = None) -> list[dict[str, Any]] | None:
    """The ``svdquant.fused_loras`` a quantized ``source``'s model card lists (None: no card, or none listed).

    A reloaded model's layers no longer know which LoRAs were fused into them (their widths do), so re-saving a
    quantized source carries the names over from the card it was saved with.
    """
    from huggingface_hub import ModelCard

    try:
        local = Path(source) / "README.md"
        path = local if local.is_file() else hf_hub_download(str(source), "README.md", token=token)
        meta = ModelCard.load(path).data.to_dict().get("svdquant") or {}
    except Exception:  # no card (a plain save_pretrained folder, a repo without README): nothing to carry over
        return None
    return meta.get("fused_loras") or None


def quantize_and_push(
    source: str | os.PathLike,
    repo_id: str | None,
    *,
    subfolder: str | None = None,
    rank: int = DEFAULT_RANK,
    calibration: str | os.PathLike | None = None,
    torch_dtype: str | torch.dtype = "bf16",
    base_model: str | None = None,
    max_shard_size: int | str | None = None,
    measure: bool = False,
    save_directory: str | os.PathLike | None = None,
    token: str | None = None,
    revision: str = "main",
    private: bool | None = None,
    overwrite: bool = False,
    create: bool = True,
    endpoint: str | None = None,
) -> tuple[Path, PushResult | None]:
    """Load ``source`` quantizing on load (``SVDQuantConfig(rank, calibration=...)``), save with a card, push.

    A ``source`` that already holds an SVDQuant checkpoint is loaded as is (no re-quantization). The output repo
    keeps ``subfolder`` (a pipeline's ``transformer/`` stays ``transformer/``).

    Args:
        source: a Hub repo id or a local folder of a diffusers model.
        repo_id: where to push; None saves only (to ``save_directory``).
        subfolder: the model's folder in ``source`` and in the output.
        rank, calibration: :class:`SVDQuantConfig` settings (``calibration``: a statistics safetensors file).
        torch_dtype: dtype to quantize in (``"bf16"``, ``"fp16"``, ``"fp32"``).
        base_model: card metadata; default ``source`` when it is a Hub repo id.
        max_shard_size: shard the saved weights.
        measure: also load the 16-bit model and put one denoiser call's quality figures in the card.
        save_directory: where to save (default: a temporary folder removed after the push).
        token, revision, private, overwrite, create, endpoint: as in :func:`push` (``endpoint`` is where to push;
            a Hub ``source`` is read from huggingface_hub's endpoint, ``HF_ENDPOINT``).

    Returns:
        The saved folder (gone if it was temporary) and the push result (None when ``repo_id`` is None).
    """
    from diffusers import AutoModel

    dtype = parse_dtype(torch_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if token is not None:
        kwargs["token"] = token
    local = Path(source).is_dir()
    if base_model is None and not local:
        base_model = str(source)
    if local:
        config_file = Path(source) / (subfolder or "") / "config.json"
    else:
        config_file = hf_hub_download(str(source), "config.json", subfolder=subfolder, token=token)
    config = json.loads(Path(config_file).read_text())
    pre_quantized = (config.get("quantization_config") or {}).get("quant_method") == "svdquant"
    if pre_quantized:
        # Loaded as saved: its recorded dtype, no re-quantization (rank and calibration do not apply).
        del kwargs["dtype"]
    else:
        kwargs["quantization_config"] = SVDQuantConfig(rank=rank, calibration=calibration)
    model = AutoModel.from_pretrained(str(source), **kwargs).eval()
    quality = None
    if measure:
        if pre_quantized:
            raise ValueError(f"{source} is already quantized: there is no 16-bit model to measure against")
        model16 = AutoModel.from_pretrained(
            str(source), **{k: v for k, v in kwargs.items() if k != "quantization_config"}
        ).eval()
        quality = denoiser_quality(model16, model)
        del model16
    tmp = None
    if save_directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="svdquant-")
        save_directory = tmp.name
    try:
        folder = save_quantized(
            model,
            save_directory,
            repo_id=repo_id or str(save_directory),
            base_model=base_model,
            subfolder=subfolder,
            quality=quality,
            calibration=None if calibration is None or pre_quantized else Path(calibration).name,
            max_shard_size=max_shard_size,
            fused_loras=source_fused_loras(source, token) if pre_quantized else None,
        )
        result = None
        if repo_id is not None:
            result = push(
                folder,
                repo_id,
                token=token,
                revision=revision,
                private=private,
                overwrite=overwrite,
                create=create,
                endpoint=endpoint,
                commit_message=f"SVDQuant W4A4 r{model.config.quantization_config.rank} of {source}",
            )
        return folder, result
    finally:
        if tmp is not None:
            tmp.cleanup()
