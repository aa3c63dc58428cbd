"""Moving SVDQuant checkpoints to and from the Hugging Face Hub (or any Hub-compatible endpoint).

* :func:`save_quantized` (:mod:`.card`) — ``save_pretrained`` plus a generated model card (``README.md``: metadata,
  the config, sizes before/after, quality figures when given, the exact load snippet).
* :func:`push` (:mod:`.upload`) — upload a saved folder as **one commit** on top of the commit it checked,
  refusing to replace a repo that holds a different model unless ``overwrite=True``; auth failures, missing
  repos and a network that drops mid-upload raise a :class:`HubError` (:mod:`.errors`) that says what state
  the remote repo is in.
* :func:`quantize_and_push` (:mod:`.publish`) — load a 16-bit model repo or folder quantizing on load, save with a
  card, push.
* :func:`pull` / :func:`load` / :func:`generate` (:mod:`.download`) — ``snapshot_download`` into a cache, then
  plain ``from_pretrained(repo_id)``, with ``revision``, ``subfolder``, ``cache_dir`` and offline mode working as
  in diffusers.
* :func:`verify_checksums` (:mod:`.checksums`) — compare a saved folder with the per-tensor checksums
  ``save_quantized`` wrote.
* :func:`inspect_repo` (:mod:`.repo_report`) — what a (remote or local) quantized repo holds, from the configs and the
  safetensors headers only (no weight download).

The endpoint is huggingface_hub's (``HF_ENDPOINT``) unless ``endpoint=`` is passed; the token is huggingface_hub's
(``HF_TOKEN`` / ``hf auth login``) unless ``token=`` is passed.
"""

from .card import DEFAULT_TAGS, load_snippet, model_card, save_quantized, weight_sizes
from .checksums import verify_checksums, write_checksums
from .download import generate, load, pull, verify_repo
from .errors import HubAuthError, HubError, HubRepoNotFoundError, HubUploadError, RepoHoldsDifferentModelError
from .publish import quantize_and_push
from .repo_report import ModelReport, RepoReport, inspect_repo
from .upload import PushResult, model_identity, push

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
    "model_card",
    "model_identity",
    "pull",
    "push",
    "quantize_and_push",
    "save_quantized",
    "verify_checksums",
    "verify_repo",
    "weight_sizes",
    "write_checksums",
]
