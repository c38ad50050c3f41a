"""sana.hub.resolve: local paths, the Hugging Face cache without network, and one clear error for each failure.

No test touches the network: HF_HOME points into a temporary folder, sockets refuse to connect (and record the
attempt), and Hub errors are raised by a stand-in for `snapshot_download`.
"""

import re
import socket
from types import SimpleNamespace

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import sana.hub
from sana.errors import SanaError
from sana.hub import HubError, is_repo_id, resolve

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; constants are patched too since huggingface_hub reads them at import."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection or name lookup fails and is recorded: the list stays empty if nothing tried."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def cache_repo(cache, repo_id, commit=COMMIT_A, refs=("main",), files=None):
    """The layout huggingface_hub writes: blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/<name> = commit."""
    files = files or {"config.json": '{"_class_name": "SanaTransformer2DModel"}', "model.safetensors": "weights"}
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for i, (name, text) in enumerate(files.items()):
        blob = repo / "blobs" / f"{commit[:8]}{i:032d}"
        blob.write_text(text)
        (snapshot / name).symlink_to(blob)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def http_error(cls, status, message="error"):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} Client Error: {message}", response=response)


@pytest.fixture
def fake_download(monkeypatch):
    """Replace snapshot_download: nothing is cached, and the download raises `fake_download.error`."""
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        raise state.error

    state = SimpleNamespace(calls=calls, error=None)
    monkeypatch.setattr(sana.hub, "snapshot_download", snapshot_download)
    return state


def forbid_download(monkeypatch):
    def snapshot_download(**kwargs):
        raise AssertionError(f"snapshot_download called with {kwargs}")

    monkeypatch.setattr(sana.hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize(
    "s",
    ["owner/name", "Efficient-Large-Model/Sana_600M_1024px_diffusers", "a/b", "user_1/model.v2", "x" * 96 + "/y"],
)
def test_is_repo_id_accepts(s):
    assert is_repo_id(s)


@pytest.mark.parametrize(
    "s",
    ["foo", "", "./missing/dir", "a/b/c", "/abs/path", "owner/", "/name", "owner/na me", "a--b/c", "owner/a..b",
     "owner/name.git", "-owner/name", "owner/name-", "x" * 97 + "/y", "owner\\name"],
)  # fmt: skip
def test_is_repo_id_rejects(s):
    assert not is_repo_id(s)


def test_local_paths_pass_through(tmp_path, monkeypatch):
    forbid_download(monkeypatch)
    folder = tmp_path / "model"
    folder.mkdir()
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    assert resolve(str(folder)) == folder
    assert resolve(str(file)) == file
    assert resolve(str(file), revision="v1", allow_patterns=["*.json"]) == file
    # A folder that also looks like a repo id is the folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert resolve("owner/name").resolve() == (tmp_path / "owner" / "name").resolve()
    # "~" is the home folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/model") == folder


@pytest.mark.parametrize("s", ["foo", "./missing/dir", "", "a/b/c", "owner/na me", "missing.safetensors"])
def test_invalid_strings(s, monkeypatch):
    forbid_download(monkeypatch)
    with pytest.raises(HubError, match="no such file or folder, and not a Hugging Face repo id") as info:
        resolve(s)
    assert isinstance(info.value, SanaError)
    assert repr(s) in str(info.value)


def assert_not_cached_message(message, cache, revision=None):
    assert "not in the local Hugging Face cache" in message
    assert str(cache / "models--owner--name") in message
    assert "local folder path" in message
    download = "download owner/name" + ("" if revision is None else f" --revision {revision}")
    assert re.search(rf"`(hf|huggingface-cli) {download}`", message), message
    assert "\n" not in message


def test_offline_not_cached(hf_cache, offline, no_network):
    with pytest.raises(HubError) as info:
        resolve("owner/name")
    message = str(info.value)
    assert_not_cached_message(message, hf_cache)
    assert "HF_HUB_OFFLINE is set" in message
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    assert no_network == []  # really offline: not even a name lookup


def test_offline_set_in_environment_after_import(hf_cache, online, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub.constants still says online
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        resolve("owner/name")
    assert no_network == []


def test_connection_refused_not_cached(hf_cache, online, no_network):
    """The real huggingface_hub tries the network, fails, and the failure becomes the not-cached message."""
    with pytest.raises(HubError) as info:
        resolve("owner/name")
    message = str(info.value)
    assert_not_cached_message(message, hf_cache)
    assert "cannot be reached (no connection" in message
    assert no_network, "huggingface_hub should have tried to connect (so the no_network fixture works)"


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_cached_repo_resolves_without_network(hf_cache, no_network, mode, request):
    request.getfixturevalue(mode)
    snapshot = cache_repo(hf_cache, "owner/name")
    path = resolve("owner/name", allow_patterns=["*.json", "*.safetensors"])
    assert path == snapshot
    assert (path / "model.safetensors").read_text() == "weights"
    assert no_network == []


def test_cached_revisions_offline(hf_cache, offline, no_network):
    snapshot_a = cache_repo(hf_cache, "owner/name", COMMIT_A, refs=("main",))
    snapshot_b = cache_repo(hf_cache, "owner/name", COMMIT_B, refs=("v1",))
    assert resolve("owner/name") == snapshot_a
    assert resolve("owner/name", revision="v1") == snapshot_b
    assert resolve("owner/name", revision=COMMIT_B) == snapshot_b
    with pytest.raises(HubError) as info:
        resolve("owner/name", revision="v2")
    assert "'owner/name' at revision 'v2'" in str(info.value)
    assert_not_cached_message(str(info.value), hf_cache, revision="v2")
    assert no_network == []


def test_cache_first_then_download_with_arguments_passed(hf_cache, online, monkeypatch, tmp_path):
    calls = []
    downloaded = tmp_path / "snapshot"

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(downloaded)

    monkeypatch.setattr(sana.hub, "snapshot_download", snapshot_download)
    patterns = ["*.json", "*.safetensors"]
    assert resolve("owner/name", revision="v1.0", allow_patterns=patterns) == downloaded
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    for c in calls:
        assert c["repo_id"] == "owner/name"
        assert c["revision"] == "v1.0"
        assert c["allow_patterns"] == patterns
        assert str(c["cache_dir"]) == str(hf_cache)


def test_cached_repo_is_not_downloaded_again(hf_cache, online, monkeypatch, tmp_path):
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(sana.hub, "snapshot_download", snapshot_download)
    assert resolve("owner/name") == tmp_path
    assert len(calls) == 1 and calls[0]["local_files_only"] is True


def _local_entry_from_connection():
    error = LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")
    error.__cause__ = ConnectionError("Connection refused")
    return error


@pytest.mark.parametrize(
    "make_error, revision, expected",
    [
        (lambda: http_error(RepositoryNotFoundError, 404), None,
         ["repository 'owner/name' was not found", "check the name", "login`"]),
        (lambda: http_error(GatedRepoError, 403), None,
         ["'owner/name' is gated", "https://huggingface.co/owner/name", "login`"]),
        (lambda: http_error(RevisionNotFoundError, 404), "nope",
         ["revision 'nope' was not found in Hugging Face repository 'owner/name'", "branch, tag or commit"]),
        (lambda: http_error(HfHubHTTPError, 401), None, ["refused (HTTP 401)", "login`"]),
        (lambda: http_error(HfHubHTTPError, 500, "Internal Server Error"), None,
         ["answered with an error", "HTTP 500", "try again later"]),
        (_local_entry_from_connection, None,
         ["not in the local Hugging Face cache", "no connection: ConnectionError", "download owner/name`"]),
        (lambda: ConnectionError("Connection reset by peer"), None, ["no connection: ConnectionError"]),
        (lambda: TimeoutError("timed out"), "v1", ["'owner/name' at revision 'v1'", "no connection: TimeoutError"]),
        (lambda: OSError(28, "No space left on device"), None,
         ["could not download 'owner/name' into the cache", "No space left on device", "HF_HOME"]),
    ],
)  # fmt: skip
def test_hub_errors_become_one_message(hf_cache, online, fake_download, make_error, revision, expected):
    fake_download.error = make_error()
    with pytest.raises(HubError) as info:
        resolve("owner/name", revision=revision)
    message = str(info.value)
    for part in expected:
        assert part in message, message
    assert "\n" not in message and "Traceback" not in message
    assert info.value.__cause__ is fake_download.error
    assert [c.get("local_files_only", False) for c in fake_download.calls] == [True, False]
