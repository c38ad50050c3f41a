"""Find model files: a local path as is, or a Hugging Face Hub repository through its local cache.

`resolve` never needs the network for something already on disk. An existing local path is returned as is, even
when it also looks like a repo id (a folder "owner/name" under the working directory). A repo id is first looked up
in the Hugging Face cache (HF_HOME / HF_HUB_CACHE, as `huggingface_hub` lays it out) with `local_files_only=True`.
Only a repo that is not cached (or cached incompletely) is downloaded, and only when the Hub is not switched off
with HF_HUB_OFFLINE=1. Downloads resume after an interruption and land in the same cache.

A cached branch or tag (the default revision is "main") is not checked for newer commits; pin `revision` to a
commit hash to be exact, or download again with the Hugging Face CLI to update the cache.

Every failure is one `HubError` whose message says what happened and what to do next.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sana.errors import SanaError

__all__ = ["DIFFUSERS_ALLOW_PATTERNS", "HubError", "is_repo_id", "resolve"]

# What a diffusers-layout repo needs: configs, safetensors weights and tokenizer files; never the .bin/.pth
# duplicates. Original NVlabs repos keep .pth checkpoints, so pass patterns of their own for those.
DIFFUSERS_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]

# "owner/name": each part starts and ends with a letter, digit or "_", holds only letters, digits, "_", "-" and
# ".", is at most 96 characters, has no "--" or "..", and the name does not end in ".git" (the Hub's own rules).
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Transport errors (requests, httpx, urllib3, ...) named by class so that no client library has to be imported.
_CONNECTION_ERRORS = {"ConnectError", "ConnectionError", "NetworkError", "ProxyError", "Timeout", "TimeoutException"}


class HubError(SanaError):
    """A model could not be found locally or fetched from the Hugging Face Hub: the message says what to do."""


def is_repo_id(s: str) -> bool:
    """True when `s` has the form of a Hugging Face repo id, "owner/name" (whether or not it exists)."""
    return (
        isinstance(s, str)
        and _REPO_ID.fullmatch(s) is not None
        and "--" not in s
        and ".." not in s
        and not s.endswith(".git")
    )


def resolve(name_or_path: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """The local path of a model: an existing file or folder as is, or the cached snapshot of a Hub repo id.

    revision: branch, tag or commit hash of the repo (default: "main"); ignored for a local path.
    allow_patterns: glob patterns of the repo files to fetch (default: all), e.g. `DIFFUSERS_ALLOW_PATTERNS`.
    Raises `HubError` when the path does not exist and the repo cannot be had.
    """
    name_or_path = os.fspath(name_or_path)
    local = os.path.expanduser(name_or_path)
    if name_or_path and os.path.exists(local):  # os.path.exists is False (no exception) for odd strings
        return Path(local)
    if not is_repo_id(name_or_path):
        raise HubError(
            f"{name_or_path!r}: no such file or folder, and not a Hugging Face repo id (expected a local path or "
            "'owner/name', e.g. 'Efficient-Large-Model/Sana_600M_1024px_diffusers')"
        )
    repo_id = name_or_path
    kwargs = {"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns}
    cache_dir = Path(constants.HF_HUB_CACHE)
    try:
        # 1. The local cache only: no network at all.
        try:
            return Path(snapshot_download(**kwargs, cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError as e:  # not cached, or cached incompletely
            if _offline():
                raise HubError(_not_cached(repo_id, revision, cache_dir, e, offline=True)) from e
        # 2. Download (resumable) into the same cache.
        return Path(snapshot_download(**kwargs, cache_dir=cache_dir))
    except HubError:
        raise
    except Exception as e:
        raise HubError(_explain(e, repo_id, revision, cache_dir)) from e


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set in the environment since."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def _cli() -> str:
    """The Hugging Face command line of the installed huggingface_hub (`hf` since 1.0)."""
    major = huggingface_hub.__version__.split(".")[0]
    return "hf" if major.isdigit() and int(major) >= 1 else "huggingface-cli"


def _login() -> str:
    return "hf auth login" if _cli() == "hf" else "huggingface-cli login"


def _repo_folder(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def _what(repo_id: str, revision: str | None) -> str:
    return f"{repo_id!r}" if revision is None else f"{repo_id!r} at revision {revision!r}"


def _not_cached(repo_id: str, revision: str | None, cache_dir: Path, error: Exception, offline: bool) -> str:
    """The message for a repo that is not (completely) in the cache while the Hub cannot be reached."""
    incomplete = getattr(huggingface_hub.errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x
    state = "is incomplete in" if isinstance(error, incomplete) else "is not in"
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ else error
    why = "HF_HUB_OFFLINE is set" if offline else f"no connection: {type(cause).__name__}"
    download = f"{_cli()} download {repo_id}" + ("" if revision is None else f" --revision {revision}")
    again = "unset HF_HUB_OFFLINE and run this again" if offline else "run this again with network access"
    return (
        f"model {_what(repo_id, revision)} {state} the local Hugging Face cache ({_repo_folder(repo_id, cache_dir)}) "
        f"and the Hub cannot be reached ({why}); it is not a local path either. Pass a local folder path, or "
        f"download it once with network access: run `{download}`, or {again}"
    )


def _is_connection_error(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        c.__name__ in _CONNECTION_ERRORS for c in type(e).__mro__
    )


def _explain(e: Exception, repo_id: str, revision: str | None, cache_dir: Path) -> str:
    """One message for a failure of `snapshot_download`, from the most specific cause to the least."""
    what = _what(repo_id, revision)
    if isinstance(e, GatedRepoError):
        return (
            f"Hugging Face repository {repo_id!r} is gated: accept its terms at https://huggingface.co/{repo_id} "
            f"and log in with `{_login()}`"
        )
    if isinstance(e, RepositoryNotFoundError):
        return (
            f"Hugging Face repository {repo_id!r} was not found (and it is not a local path): check the name, or "
            f"if it is private, log in with `{_login()}`"
        )
    if isinstance(e, RevisionNotFoundError):
        return (
            f"revision {revision!r} was not found in Hugging Face repository {repo_id!r}: check the branch, tag or "
            "commit hash"
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return (
                f"access to Hugging Face repository {repo_id!r} was refused (HTTP {status}): log in with "
                f"`{_login()}` using a token that can read it"
            )
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the Hugging Face Hub answered with an error for {what} (HTTP {status}): {first_line}; try again later"
    if isinstance(e, HFValidationError):
        return f"{repo_id!r} is not a valid Hugging Face repo id: {e}"
    if isinstance(e, OfflineModeIsEnabled):
        return _not_cached(repo_id, revision, cache_dir, e, offline=True)
    if isinstance(e, LocalEntryNotFoundError) or _is_connection_error(e):
        return _not_cached(repo_id, revision, cache_dir, e, offline=isinstance(e.__cause__, OfflineModeIsEnabled))
    if isinstance(e, OSError):
        return (
            f"could not download {what} into the cache {cache_dir}: {e}. Check free disk space and permissions, "
            "or set HF_HOME to a writable folder"
        )
    return f"could not download {what} from the Hugging Face Hub: {type(e).__name__}: {e}"
