"""Files in, state dicts out: safetensors (single or sharded), original .pth, and atomic writes.

Nothing here knows a model; the converters beside it do. Every failure is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from sana.errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# Wrappers that training scripts put around the weights ("state_dict" in NVlabs .pth files).
_WRAPPER_KEYS = ("state_dict", "model", "module")

# Prefixes tools put before every key: single-file checkpoints, DDP, torch.compile.
WRAPPER_PREFIXES = ("model.diffusion_model.", "module.", "_orig_mod.")

SAFETENSORS_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def read_safetensors(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Read one .safetensors file and its string metadata."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from e


def read_pth(path: str | Path) -> StateDict:
    """Read a pickled torch checkpoint safely (weights_only=True), unwrapping a "state_dict" wrapper."""
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises many types for bad pickles / truncated zips
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> StateDict:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")


def strip_prefixes(sd: StateDict) -> StateDict:
    """Drop wrapper prefixes present on every key (single-file `model.diffusion_model.`, DDP `module.`)."""
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_sharded(index_path: str | Path) -> StateDict:
    """Read a sharded safetensors checkpoint through its index.json (weight_map: key -> shard file)."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read shard index {index_path}: {e}") from e
    sd: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        part, _ = read_safetensors(index_path.parent / shard)
        sd.update(part)
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{index_path}: keys listed in the index but absent from the shards: {missing[:5]}")
    return sd


def read_weights(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Read a weights file of any supported kind: .safetensors, .pth/.pt/.bin/.ckpt, or an index.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    name = path.name
    if name.endswith(".index.json"):
        return read_sharded(path), {}
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return read_pth(path), {}
    raise CheckpointError(f"{path}: unknown weights file type (expected .safetensors, .pth, .pt, .bin)")


def find_weights_in_folder(folder: str | Path) -> Path:
    """The weights file of a diffusers-style folder: sharded index first, then a single file."""
    folder = Path(folder)
    for name in SAFETENSORS_INDEX_NAMES + SAFETENSORS_NAMES:
        if (folder / name).exists():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(
        f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors, model.safetensors "
        f"or a sharded index)" + (f"; several candidates: {[c.name for c in candidates]}" if candidates else "")
    )


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def atomic_write(path: str | Path, write_fn) -> None:
    """Write through `write_fn(tmp_path)` to a temporary file beside `path`, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved checkpoint gets the usual permissions
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_safetensors(path: str | Path, sd: StateDict, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors atomically (tensors made contiguous, shared storage broken)."""
    tensors = {
        k: v.detach().contiguous().clone() if _shares_storage(v, sd) else v.detach().contiguous() for k, v in sd.items()
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _shares_storage(t: torch.Tensor, sd: StateDict) -> bool:
    # safetensors refuses tensors that alias; views made by chunk() in converters do.
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))
