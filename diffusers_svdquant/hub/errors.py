"""What the Hub operations raise, and how a huggingface_hub failure becomes one clear message."""

from __future__ import annotations

from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


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


def describe(err: BaseException) -> str:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        chain.append(f"{type(err).__name__}: {text}" if text else type(err).__name__)
        err = err.__cause__ or err.__context__
    return " <- ".join(chain[:3])


def auth_or_missing(err: HfHubHTTPError, repo_id: str, endpoint: str, action: str, unchanged: str) -> HubError | None:
    status = err.response.status_code if err.response is not None else None
    if isinstance(err, RevisionNotFoundError):
        return HubRepoNotFoundError(
            f"{action}: revision not found in {repo_id!r} on {endpoint} ({describe(err)}). {unchanged}"
        )
    # The Hub answers "not found" for a private repo the token cannot see, so both readings are offered.
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        return HubRepoNotFoundError(
            f"{action}: repo {repo_id!r} not found on {endpoint} ({describe(err)}); check the name, or the "
            f"token's access if it is private. {unchanged}"
        )
    if status in (401, 403):
        why = "rejected the token (401)" if status == 401 else "denied write access (403)"
        return HubAuthError(
            f"{action}: {endpoint} {why} for {repo_id!r}: {describe(err)}. Pass a valid token (token=, HF_TOKEN or "
            f"`hf auth login`) with write access to the namespace. {unchanged}"
        )
    return None


def is_network_error(e: BaseException) -> bool:
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


def pull_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> HubError | None:
    """The :class:`HubError` for a failed download of ``repo_id``, or None when ``e`` is not a Hub failure."""
    at = f"{repo_id}@{revision or 'main'}"
    if isinstance(e, RevisionNotFoundError):
        return HubRepoNotFoundError(f"pull {at}: revision {revision!r} not found in {repo_id!r} on {endpoint}")
    if isinstance(e, HfHubHTTPError):
        return auth_or_missing(e, repo_id, endpoint, f"pull {at}", "")
    if isinstance(e, LocalEntryNotFoundError):
        return HubError(
            f"pull {at}: not in the local cache and {endpoint} cannot be reached (or HF_HUB_OFFLINE is set): {e}"
        )
    return None
