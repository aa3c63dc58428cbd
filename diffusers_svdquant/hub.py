"""Moving SVDQuant checkpoints to and from the Hugging Face Hub (or any Hub-compatible endpoint).

* :func:`save_quantized` — ``save_pretrained`` plus a generated model card (``README.md``: metadata, the config,
  sizes before/after, quality figures when given, the exact load snippet).
* :func:`push` — upload a saved folder as **one commit** on top of the commit it checked, refusing to replace a
  repo that holds a different model unless ``overwrite=True``; auth failures, missing repos and a network that drops
  mid-upload raise a :class:`HubError` that says what state the remote repo is in.
* :func:`quantize_and_push` — load a 16-bit model repo or folder quantizing on load, save with a card, push.
* :func:`pull` / :func:`load` / :func:`generate` — ``snapshot_download`` into a cache, then plain
  ``from_pretrained(repo_id)`` (after ``import diffusers_svdquant``), with ``revision``, ``subfolder``,
  ``cache_dir`` and offline mode working as in diffusers.
* :func:`inspect_repo` — what a (remote or local) quantized repo holds, from the configs and the safetensors
  headers only (no weight download).

The endpoint is huggingface_hub's (``HF_ENDPOINT``) unless ``endpoint=`` is passed; the token is huggingface_hub's
(``HF_TOKEN`` / ``hf auth login``) unless ``token=`` is passed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from .config import SVDQuantConfig
from .linear import SVDQuantLinear

DEFAULT_TAGS = ("svdquant", "4-bit", "w4a4", "int4", "quantized", "diffusers")
# Files a repo may hold without holding a model (what create_repo and a card-only commit leave).
_NON_MODEL_FILES = {".gitattributes", "README.md"}
# Config keys that change between saves of the same model (library versions, load paths) or describe the
# quantization settings rather than the model: a model re-quantized with another rank is still the same model.
_VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures"}


class HubError(RuntimeError):
    """A Hub operation failed; the message names the repo and says what state the remote repo is in."""


class HubAuthError(HubError):
    """The endpoint rejected the token (401) or it lacks write access (403)."""


class HubRepoNotFoundError(HubError):
    """The repo (or the revision) does not exist, or the token cannot see it."""


class HubUploadError(HubError):
    """The upload failed part way (connection dropped, server error, a concurrent commit)."""


class RepoHoldsDifferentModelError(HubError):
    """The target repo holds another model and ``overwrite=True`` was not given."""


# --------------------------------------------------------------------------------------------------------------
# Sizes and the model card
# --------------------------------------------------------------------------------------------------------------


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
    """
    modules = _modules(obj)
    quantized = {name: qc for name, m in modules.items() if (qc := _quant_config(m)) is not None}
    if not quantized:
        raise ValueError(f"{type(obj).__name__} has no SVDQuant-quantized model: nothing to describe as svdquant")
    pipeline = not isinstance(obj, nn.Module)
    class_name = type(obj).__name__
    dense, quant = weight_sizes(obj)
    layers = sum(isinstance(m, SVDQuantLinear) for mod in modules.values() for m in mod.modules())

    meta: dict[str, Any] = {
        "config": next(iter(quantized.values())) if len(quantized) == 1 else quantized,
        "quantized_layers": layers,
        "calibration": calibration,
        "bytes_16bit": dense,
        "bytes_quantized": quant,
    }
    if checkpoint_bytes is not None:
        meta["checkpoint_bytes"] = checkpoint_bytes
    if quality:
        meta["quality"] = dict(quality)
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image" if pipeline else None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *extra_tags])),
        svdquant=meta,
    )

    title = repo_id.rstrip("/").split("/")[-1]
    where = f" (`{subfolder}/`)" if subfolder else ""
    body = [
        f"# {title}",
        "",
        f"SVDQuant W4A4 ([arXiv 2411.05007](https://arxiv.org/abs/2411.05007)) {class_name}{where}"
        + (f", quantized from [`{base_model}`](https://huggingface.co/{base_model})" if base_model else "")
        + ": the linear layers' weights and activations are INT4 in groups of 64 along the input, with a "
        "16-bit low-rank branch absorbing the outliers. Made with diffusers-svdquant; one checkpoint runs on x86 "
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
    body += ["", f"{dense / max(quant, 1):.2f}x smaller; {layers} linear layers quantized.", ""]
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
) -> Path:
    """Save a quantized model or pipeline in the canonical format with a generated ``README.md`` model card.

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
    ckpt = sum(p.stat().st_size for p in _weight_files(root))
    card = model_card(
        obj,
        repo_id or str(root),
        base_model=base_model,
        subfolder=subfolder,
        quality=quality,
        checkpoint_bytes=ckpt,
        calibration=calibration,
    )
    card.save(root / "README.md")
    return root


# --------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    """What :func:`push` did: the new commit on ``revision`` (or the unchanged head when nothing changed)."""

    repo_id: str
    revision: str
    commit_id: str
    parent_commit: str | None
    uploaded: list[str]
    deleted: list[str]
    url: str


def _config_paths(files: list[str]) -> list[str]:
    """The model-describing configs of a repo listing: root and one-level ``config.json`` and ``model_index.json``."""
    return sorted(
        f
        for f in files
        if f in ("config.json", "model_index.json") or (f.count("/") == 1 and f.endswith("/config.json"))
    )


def model_identity(config: dict) -> dict:
    """What makes a saved model *that* model: its config without versions, load paths and quantization settings.

    A re-quantization (another rank, a calibration) keeps the identity; another architecture, other layer sizes,
    or a 16-bit model in place of a quantized one change it.
    """
    out = {}
    for k, v in config.items():
        if k in _VOLATILE_KEYS or (k.startswith("_") and k != "_class_name"):
            continue
        if k == "quantization_config":
            v = {"quant_method": v.get("quant_method")} if isinstance(v, dict) else v
        out[k] = v
    return out


def _describe(err: BaseException) -> str:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        chain.append(f"{type(err).__name__}: {text}" if text else type(err).__name__)
        err = err.__cause__ or err.__context__
    return " <- ".join(chain[:3])


def _auth_or_missing(err: HfHubHTTPError, repo_id: str, endpoint: str, action: str, unchanged: str) -> HubError | None:
    status = err.response.status_code if err.response is not None else None
    if isinstance(err, RevisionNotFoundError):
        return HubRepoNotFoundError(
            f"{action}: revision not found in {repo_id!r} on {endpoint} ({_describe(err)}). {unchanged}"
        )
    # The Hub answers "not found" for a private repo the token cannot see, so both readings are offered.
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        return HubRepoNotFoundError(
            f"{action}: repo {repo_id!r} not found on {endpoint} ({_describe(err)}); check the name, or the "
            f"token's access if it is private. {unchanged}"
        )
    if status in (401, 403):
        why = "rejected the token (401)" if status == 401 else "denied write access (403)"
        return HubAuthError(
            f"{action}: {endpoint} {why} for {repo_id!r}: {_describe(err)}. Pass a valid token (token=, HF_TOKEN or "
            f"`hf auth login`) with write access to the namespace. {unchanged}"
        )
    return None


def _remote_files(api: HfApi, repo_id: str, revision: str) -> tuple[str, list[str]]:
    info = api.repo_info(repo_id, revision=revision)
    return info.sha, [s.rfilename for s in info.siblings or []]


def _check_same_model(
    api: HfApi, repo_id: str, head: str, remote: list[str], folder: Path, local: list[str], unchanged: str
) -> None:
    if not set(remote) - _NON_MODEL_FILES:
        return
    local_cfg, remote_cfg = _config_paths(local), _config_paths(remote)
    reason = None
    if local_cfg != remote_cfg:
        reason = f"its model configs are {remote_cfg or 'absent'}, the upload's are {local_cfg}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for path in local_cfg:
                got = hf_hub_download(
                    repo_id, path, revision=head, cache_dir=tmp, token=api.token, endpoint=api.endpoint
                )
                theirs = model_identity(json.loads(Path(got).read_text()))
                ours = model_identity(json.loads((folder / path).read_text()))
                if theirs != ours:
                    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                    reason = f"{path} differs in {keys[:6]}"
                    break
            if reason is None and "README.md" in remote and (folder / "README.md").is_file():
                got = hf_hub_download(
                    repo_id, "README.md", revision=head, cache_dir=tmp, token=api.token, endpoint=api.endpoint
                )
                theirs = ModelCard.load(got).data.base_model
                ours = ModelCard.load(folder / "README.md").data.base_model
                if theirs and ours and theirs != ours:
                    reason = f"its base_model is {theirs!r}, the upload's is {ours!r}"
    if reason is not None:
        raise RepoHoldsDifferentModelError(
            f"refusing to push {folder} to {repo_id!r}: the repo holds a different model ({reason}). Pass "
            f"overwrite=True (--overwrite) to replace it; its history keeps the old commit {head}. {unchanged}"
        )


def _folder_files(folder: Path) -> list[str]:
    """Files of a saved model folder, as repo paths; hidden entries (``.git``, the ``.cache/`` of a ``local_dir``
    download) are not part of the model, ``.gitattributes`` is."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and (rel == ".gitattributes" or not any(part.startswith(".") for part in rel.split("/"))):
            out.append(rel)
    return sorted(out)


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    revision: str = "main",
    private: bool | None = None,
    overwrite: bool = False,
    create: bool = True,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a saved quantized model folder to ``repo_id`` as one commit.

    The commit adds every file of ``folder`` and deletes the repo's files that are not in it (stale shards of an
    earlier upload), and names the head it checked as its parent, so a concurrent push makes it fail rather than
    interleave. Before uploading, a repo that already holds a model is compared with the upload
    (:func:`model_identity` of each config, and the cards' ``base_model``): a different model is refused unless
    ``overwrite=True``.

    Args:
        folder: what :func:`save_quantized` wrote.
        repo_id: ``namespace/name``.
        token: a write token (default: huggingface_hub's).
        revision: the branch to commit to (created from ``main`` when missing).
        private: visibility when the repo is created.
        overwrite: replace a repo that holds a different model.
        create: create the repo when it does not exist (else: :class:`HubRepoNotFoundError`).
        commit_message: default ``"Upload SVDQuant model"``.
        endpoint: the Hub endpoint (default: huggingface_hub's, i.e. ``HF_ENDPOINT``).

    Raises:
        HubAuthError, HubRepoNotFoundError, RepoHoldsDifferentModelError: before anything was uploaded.
        HubUploadError: the upload failed; the message says whether the remote repo is unchanged.
    """
    folder = Path(folder)
    local = _folder_files(folder)
    if not local:
        raise FileNotFoundError(f"nothing to push: {folder} has no files")
    if not _config_paths(local):
        raise ValueError(f"{folder} holds no config.json / model_index.json: is it a saved diffusers model?")
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint
    before = f"Nothing was uploaded; the remote repo {repo_id!r} is unchanged."
    try:
        if create:
            api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head, remote = _remote_files(api, repo_id, revision)
        if not overwrite:
            _check_same_model(api, repo_id, head, remote, folder, local, before)
    except HfHubHTTPError as e:
        mapped = _auth_or_missing(e, repo_id, endpoint, f"push to {repo_id!r}", before)
        if mapped is None:
            raise HubError(f"push to {repo_id!r}: {endpoint} answered {_describe(e)}. {before}") from e
        if isinstance(mapped, HubRepoNotFoundError) and not create:
            mapped = HubRepoNotFoundError(f"{mapped} Create it first, or pass create=True (drop --no-create).")
        raise mapped from e
    except Exception as e:
        if _is_network_error(e):
            raise HubError(f"push to {repo_id!r}: cannot reach {endpoint}: {_describe(e)}. {before}") from e
        raise

    stale = sorted(set(remote) - set(local) - {".gitattributes"})
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    try:
        info = api.create_commit(
            repo_id,
            ops,
            commit_message=commit_message or "Upload SVDQuant model",
            revision=revision,
            parent_commit=head,
        )
    except Exception as e:
        raise _upload_failure(api, repo_id, revision, head, e) from e
    return PushResult(repo_id, revision, info.oid, head, local, stale, info.commit_url)


def _is_network_error(e: BaseException) -> bool:
    try:
        import httpx2 as httpx  # huggingface_hub 2.x
    except ImportError:  # huggingface_hub 1.x
        import httpx

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _upload_failure(api: HfApi, repo_id: str, revision: str, head: str, err: Exception) -> HubError:
    cause = _describe(err)
    if isinstance(err, HfHubHTTPError):
        unchanged = f"The remote repo {repo_id!r} is unchanged ({revision} is at {head})."
        mapped = _auth_or_missing(err, repo_id, api.endpoint, f"push to {repo_id!r}", unchanged)
        if mapped is not None:
            return mapped
    # Ask the server where the branch is now: the commit is the only step that changes the repo, so if the head
    # did not move, nothing of this upload is visible there.
    try:
        now = api.repo_info(repo_id, revision=revision).sha
    except Exception as e:  # the network may still be down
        return HubUploadError(
            f"push to {repo_id!r} failed mid-upload: {cause}. Could not reach {api.endpoint} to confirm the repo's "
            f"state ({_describe(e)}); the upload is a single commit, so {repo_id}@{revision} is either unchanged at "
            f"{head} or holds the whole new commit, never part of it. Run the push again."
        )
    if now == head:
        return HubUploadError(
            f"push to {repo_id!r} failed mid-upload: {cause}. The remote repo {repo_id!r} is unchanged: {revision} "
            f"is still at commit {head} (the upload is one commit, and it was not made). Run the push again; "
            f"objects already uploaded are not sent twice."
        )
    return HubUploadError(
        f"push to {repo_id!r} failed: {cause}. {revision} moved from {head} to {now} meanwhile (another push, or "
        f"this commit landed before the error); check {repo_id}@{now} before pushing again."
    )


# --------------------------------------------------------------------------------------------------------------
# Quantize and push
# --------------------------------------------------------------------------------------------------------------


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    from .cli import DTYPES

    table = {**DTYPES, **{str(d).removeprefix("torch."): d for d in DTYPES.values()}}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(table)}")
    return table[name]


def measure_quality(model16: nn.Module, modelq: nn.Module, image_tokens: int = 64, text_tokens: int = 16) -> dict:
    """One denoiser call of both models on the same seeded random inputs: relative error, cosine, PSNR."""
    from .demo import psnr
    from .model_zoo import model_inputs, timestep_value

    outs = []
    for model in (model16, modelq):
        inputs = model_inputs(model, image_tokens, text_tokens)
        with torch.no_grad():
            outs.append(model(**inputs, timestep=timestep_value(model, 0.5), return_dict=False)[0].float())
    ref, out = outs
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    p = psnr(out, ref)
    return {
        "relative error vs 16-bit (one denoiser call)": rel,
        "cosine vs 16-bit": cos,
        "PSNR vs 16-bit (dB)": p if math.isfinite(p) else "inf",
    }


def quantize_and_push(
    source: str | os.PathLike,
    repo_id: str | None,
    *,
    subfolder: str | None = None,
    rank: int = 32,
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

    dtype = _dtype(torch_dtype)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
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
        del kwargs["torch_dtype"]
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
        quality = measure_quality(model16, model)
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


# --------------------------------------------------------------------------------------------------------------
# Pull, load, generate
# --------------------------------------------------------------------------------------------------------------


def _pull_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> HubError | None:
    at = f"{repo_id}@{revision or 'main'}"
    if isinstance(e, RevisionNotFoundError):
        return HubRepoNotFoundError(f"pull {at}: revision {revision!r} not found in {repo_id!r} on {endpoint}")
    if isinstance(e, HfHubHTTPError):
        return _auth_or_missing(e, repo_id, endpoint, f"pull {at}", "")
    if isinstance(e, LocalEntryNotFoundError):
        return HubError(
            f"pull {at}: not in the local cache and {endpoint} cannot be reached (or HF_HUB_OFFLINE is set): {e}"
        )
    return None


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
        mapped = _pull_error(e, repo_id, revision, endpoint)
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
) -> nn.Module:
    """``AutoModel.from_pretrained`` of a quantized model repo (as the card's snippet, class read from the config)."""
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
        kwargs["torch_dtype"] = torch_dtype
    try:
        return AutoModel.from_pretrained(repo_id, **{k: v for k, v in kwargs.items() if v is not None}).eval()
    except Exception as e:
        mapped = _pull_error(e, repo_id, revision, constants.ENDPOINT)
        if mapped is None:
            raise
        raise mapped from e


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


# --------------------------------------------------------------------------------------------------------------
# Inspect
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelReport:
    """One model in a repo: where, its class, its quantization settings and what its weight files hold."""

    path: str
    class_name: str | None
    quantization: dict | None
    quantized_layers: int = 0
    ranks: list[int] = field(default_factory=list)
    tensors: int = 0
    weight_files: list[str] = field(default_factory=list)
    weight_bytes: int = 0


@dataclass
class RepoReport:
    """What :func:`inspect_repo` found."""

    repo: str
    revision: str | None
    commit: str | None
    files: dict[str, int]
    models: list[ModelReport]
    card: dict | None
    branches: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        from dataclasses import asdict

        return asdict(self)

    def format(self) -> str:
        """A human-readable summary."""
        lines = [f"{self.repo}" + (f" @ {self.commit}" if self.commit else "")]
        if self.branches:
            lines.append("branches: " + ", ".join(f"{b} -> {c[:12]}" for b, c in sorted(self.branches.items())))
        lines.append(f"{len(self.files)} files, {sum(self.files.values()):,} bytes")
        for m in self.models:
            where = m.path or "."
            if m.quantization is None:
                lines.append(f"  {where}: {m.class_name} (not SVDQuant)")
                continue
            q = m.quantization
            lines.append(
                f"  {where}: {m.class_name}, SVDQuant W4A4 rank {q.get('rank')}, format_version "
                f"{q.get('format_version')}, dtype {q.get('torch_dtype')}: {m.quantized_layers} quantized layers, "
                f"{m.tensors} tensors in {len(m.weight_files)} file(s), {m.weight_bytes:,} bytes"
            )
        if self.card:
            meta = self.card.get("svdquant") or {}
            if self.card.get("base_model"):
                lines.append(f"base model: {self.card['base_model']}")
            if meta.get("bytes_16bit"):
                lines.append(f"card: 16-bit {meta['bytes_16bit']:,} bytes -> {meta.get('bytes_quantized', 0):,} bytes")
            for k, v in (meta.get("quality") or {}).items():
                lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def _summarize(report: ModelReport, headers: dict[str, dict[str, tuple[str, list[int]]]]) -> None:
    for name, tensors in headers.items():
        report.weight_files.append(name)
        report.tensors += len(tensors)
        for key, (_, shape) in tensors.items():
            if key.endswith(".qweight"):
                report.quantized_layers += 1
            elif key.endswith(".lora_down") and len(shape) == 2 and shape[1] not in report.ranks:
                report.ranks.append(shape[1])


def inspect_repo(
    repo: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> RepoReport:
    """Describe a quantized repo (Hub id) or a saved folder: files, models, settings, layers, ranks, sizes.

    Remote repos are read through the API and ``Range`` requests on the safetensors headers: no weights download.
    """
    from safetensors import safe_open

    if Path(repo).is_dir():
        root = Path(repo)
        files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}

        def read_json(path: str) -> dict:
            return json.loads((root / path).read_text())

        def header(path: str) -> dict[str, tuple[str, list[int]]]:
            with safe_open(root / path, "pt") as f:
                return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}

        card = ModelCard.load(root / "README.md").data.to_dict() if "README.md" in files else None
        commit, branches = None, {}
    else:
        repo = str(repo)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            info = api.model_info(repo, revision=revision, files_metadata=True)
            branches = {b.name: b.target_commit for b in api.list_repo_refs(repo).branches}
        except Exception as e:
            mapped = _pull_error(e, repo, revision, api.endpoint)
            if mapped is None:
                raise
            raise mapped from e
        commit = info.sha
        files = {s.rfilename: s.size or 0 for s in info.siblings or []}
        tmp = tempfile.TemporaryDirectory(prefix="svdquant-inspect-")

        def read_json(path: str) -> dict:
            got = hf_hub_download(repo, path, revision=commit, cache_dir=tmp.name, token=token, endpoint=api.endpoint)
            return json.loads(Path(got).read_text())

        def header(path: str) -> dict[str, tuple[str, list[int]]]:
            meta = api.parse_safetensors_file_metadata(repo, path, revision=commit)
            return {k: (t.dtype, list(t.shape)) for k, t in meta.tensors.items()}

        card = None
        if "README.md" in files:
            got = hf_hub_download(
                repo, "README.md", revision=commit, cache_dir=tmp.name, token=token, endpoint=api.endpoint
            )
            card = ModelCard.load(got).data.to_dict()

    models = []
    for cfg_path in _config_paths(list(files)):
        if cfg_path.endswith("model_index.json"):
            continue
        cfg = read_json(cfg_path)
        sub = cfg_path.rpartition("/")[0]
        qc = cfg.get("quantization_config")
        report = ModelReport(
            sub,
            cfg.get("_class_name") or (cfg.get("architectures") or [None])[0],
            qc if isinstance(qc, dict) and qc.get("quant_method") == "svdquant" else None,
        )
        prefix = f"{sub}/" if sub else ""
        weights = sorted(
            f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :] and f.endswith(".safetensors")
        )
        _summarize(report, {w: header(w) for w in weights})
        report.weight_bytes = sum(files[w] for w in weights)
        models.append(report)
    if not Path(repo).is_dir():
        tmp.cleanup()
    if not models:
        raise HubError(f"{repo}: no config.json found at the root or one folder down: not a diffusers model repo")
    return RepoReport(str(repo), revision, commit, files, models, card, branches)


__all__ = [
    "DEFAULT_TAGS",
    "HubAuthError",
    "HubError",
    "HubRepoNotFoundError",
    "HubUploadError",
    "ModelReport",
    "PushResult",
    "RepoHoldsDifferentModelError",
    "RepoReport",
    "generate",
    "inspect_repo",
    "load",
    "load_snippet",
    "measure_quality",
    "model_card",
    "model_identity",
    "pull",
    "push",
    "quantize_and_push",
    "save_quantized",
    "weight_sizes",
]
