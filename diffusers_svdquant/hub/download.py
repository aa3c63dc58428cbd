"""Pull a quantized repo into the cache, load it, and generate with it (plain ``from_pretrained``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    constants,
    snapshot_download,
)
from torch import nn

from .checksums import verify_checksums
from .errors import pull_error


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download a quantized repo (or only ``subfolder`` + the card) into the Hub cache; returns the snapshot folder.

    After a pull, ``from_pretrained(repo_id, cache_dir=..., revision=...)`` and :func:`load` work offline
    (``HF_HUB_OFFLINE=1``).
    """
    allow = None if not subfolder else [f"{subfolder}/*", "README.md", "model_index.json"]
    endpoint = endpoint or constants.ENDPOINT
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            endpoint=endpoint,
            allow_patterns=allow,
            local_files_only=local_files_only,
        )
    except Exception as e:
        mapped = pull_error(e, repo_id, revision, endpoint)
        if mapped is None:
            raise
        raise mapped from e
    return Path(path)


def load(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    verify: bool = False,
) -> nn.Module:
    """``AutoModel.from_pretrained`` of a quantized model repo (as the card's snippet, class read from the config).

    With ``verify=True`` the files are first compared with the checksums written at save time
    (:func:`~.checksums.verify_checksums`, reading every tensor once): ``ValueError`` naming each tensor that
    changed, ``FileNotFoundError`` for a checkpoint saved without them.
    """
    from diffusers import AutoModel

    if local_files_only is None and constants.is_offline_mode():
        # diffusers 0.42 asks the Hub for the repo's file list before loading a sharded checkpoint unless
        # local_files_only is set, even under HF_HUB_OFFLINE; an explicit flag makes sharded repos load offline too.
        local_files_only = True
    kwargs = {
        "revision": revision,
        "subfolder": subfolder,
        "cache_dir": cache_dir,
        "token": token,
        "local_files_only": local_files_only,
    }
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if verify:
        verify_repo(repo_id, revision=revision, cache_dir=cache_dir, token=token)
    try:
        return AutoModel.from_pretrained(repo_id, **{k: v for k, v in kwargs.items() if v is not None}).eval()
    except Exception as e:
        mapped = pull_error(e, repo_id, revision, constants.ENDPOINT)
        if mapped is None:
            raise
        raise mapped from e


def verify_repo(
    repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> None:
    """Compare a saved folder, or a Hub repo pulled into the cache, with the checksums written at save time.

    Raises:
        ValueError: a tensor or file differs, naming each one.
        FileNotFoundError: the checkpoint was saved without checksums (plain ``save_pretrained``).
    """
    folder = Path(repo_id)
    if not folder.is_dir():
        folder = pull(str(repo_id), revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint)
    problems = verify_checksums(folder)
    if problems:
        raise ValueError(f"{repo_id}: the checkpoint differs from its checksums: " + "; ".join(problems))


_COMPONENT_BY_CLASS = {"UNet2DConditionModel": "unet"}


def generate(
    repo_id: str,
    prompt: str,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    component: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    steps: int = 4,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Pull a quantized repo, build the pipeline, generate one image for ``prompt`` and save it to ``out``.

    ``repo_id`` is either a whole pipeline (``model_index.json`` at its root, the quantized denoiser inside), or a
    quantized model; then ``base`` names the 16-bit pipeline it plugs into as ``component`` (default:
    ``"transformer"``, ``"unet"`` for a UNet).
    """
    from diffusers import DiffusionPipeline

    folder = pull(repo_id, revision=revision, cache_dir=cache_dir, token=token, subfolder=subfolder)
    common = {"cache_dir": cache_dir, "token": token}
    common = {k: v for k, v in common.items() if v is not None}
    if (folder / "model_index.json").is_file() and subfolder is None:
        pipe = DiffusionPipeline.from_pretrained(repo_id, revision=revision, **common)
    else:
        if base is None:
            raise ValueError(f"{repo_id!r} holds a model, not a pipeline: pass base= (--base) naming the pipeline")
        model = load(repo_id, revision=revision, subfolder=subfolder, cache_dir=cache_dir, token=token)
        name = component or _COMPONENT_BY_CLASS.get(type(model).__name__, "transformer")
        pipe = DiffusionPipeline.from_pretrained(base, **{name: model}, **common)
    call = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), **(pipeline_kwargs or {})}
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width
    image = pipe(prompt, **call).images[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
