"""Push a saved folder as one commit, refusing to replace a repo that holds a different model."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    hf_hub_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
)

from .errors import (
    HubError,
    HubRepoNotFoundError,
    HubUploadError,
    RepoHoldsDifferentModelError,
    auth_or_missing,
    describe,
    is_network_error,
)

# Files a repo may hold without holding a model (what create_repo and a card-only commit leave).
_NON_MODEL_FILES = {".gitattributes", "README.md"}
# Config keys that change between saves of the same model (library versions, load paths) or describe the
# quantization settings rather than the model: a model re-quantized with another rank is still the same model.
_VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures"}


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


def config_paths(files: list[str]) -> list[str]:
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


def _remote_files(api: HfApi, repo_id: str, revision: str) -> tuple[str, list[str]]:
    info = api.repo_info(repo_id, revision=revision)
    return info.sha, [s.rfilename for s in info.siblings or []]


def _check_same_model(
    api: HfApi, repo_id: str, head: str, remote: list[str], folder: Path, local: list[str], unchanged: str
) -> None:
    if not set(remote) - _NON_MODEL_FILES:
        return
    local_cfg, remote_cfg = config_paths(local), config_paths(remote)
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
    if not config_paths(local):
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
        mapped = auth_or_missing(e, repo_id, endpoint, f"push to {repo_id!r}", before)
        if mapped is None:
            raise HubError(f"push to {repo_id!r}: {endpoint} answered {describe(e)}. {before}") from e
        if isinstance(mapped, HubRepoNotFoundError) and not create:
            mapped = HubRepoNotFoundError(f"{mapped} Create it first, or pass create=True (drop --no-create).")
        raise mapped from e
    except Exception as e:
        if is_network_error(e):
            raise HubError(f"push to {repo_id!r}: cannot reach {endpoint}: {describe(e)}. {before}") from e
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


def _upload_failure(api: HfApi, repo_id: str, revision: str, head: str, err: Exception) -> HubError:
    cause = describe(err)
    if isinstance(err, HfHubHTTPError):
        unchanged = f"The remote repo {repo_id!r} is unchanged ({revision} is at {head})."
        mapped = auth_or_missing(err, repo_id, api.endpoint, f"push to {repo_id!r}", unchanged)
        if mapped is not None:
            return mapped
    # Ask the server where the branch is now: the commit is the only step that changes the repo, so if the head
    # did not move, nothing of this upload is visible there.
    try:
        now = api.repo_info(repo_id, revision=revision).sha
    except Exception as e:  # the network may still be down
        return HubUploadError(
            f"push to {repo_id!r} failed mid-upload: {cause}. Could not reach {api.endpoint} to confirm the repo's "
            f"state ({describe(e)}); the upload is a single commit, so {repo_id}@{revision} is either unchanged at "
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
