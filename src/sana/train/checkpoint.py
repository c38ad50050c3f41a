"""Full training state on disk, written atomically, and the SIGTERM request to save it.

A checkpoint is a folder ROOT/step-NNNNNNNN/ holding

    model.safetensors     the trained parameters (all of them, or the LoRA adapters) and the model's buffers
    ema.safetensors       their EMA (when one is kept)
    optimizer.pt          optimizer.state_dict()
    rng.pt                torch CPU / CUDA, python, numpy and named generator states
    state.json            step, data position, counters (written last)

It is written into a hidden temporary folder beside it, flushed to disk, then renamed into place: a crash at
any moment leaves either the complete checkpoint or none (the half-written temporary folder is ignored and
removed by the next save). Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sana.errors import CheckpointError
from sana.weights.io import read_safetensors, write_safetensors

_NAME = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"
_STATE_FILE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / _STATE_FILE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a run draws from: torch CPU and CUDA, python, numpy, and the named generators."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as plain values, so that rng.pt loads with weights_only=True.
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"the checkpoint has no state for the {name!r} generator")
        g.set_state(state["generators"][name])


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


@dataclass
class TrainingState:
    """What a checkpoint holds, in memory."""

    step: int  # optimizer updates done
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # JSON values: data position, counters, ...


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, write_fn) -> None:
    write_fn(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: str | Path, state: TrainingState, keep_last: int = 0) -> Path:
    """Write `state` to ROOT/step-NNNNNNNN atomically, then prune to the newest `keep_last` (0: keep all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):  # left by a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(state.step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", state.model)
        if state.ema is not None:
            write_safetensors(tmp / "ema.safetensors", state.ema)
        _write_file(tmp / "optimizer.pt", lambda p: torch.save(state.optimizer, p))
        _write_file(tmp / "rng.pt", lambda p: torch.save(state.rng, p))
        info = {"step": state.step, "has_ema": state.ema is not None, **state.info}
        _write_file(tmp / _STATE_FILE, lambda p: p.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n"))
        _fsync_dir(tmp)
        if final.exists():  # saving the same step again: move the old one out of the way first
            old = root / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resume_path(resume: str, root: Path) -> Path | None:
    """checkpoint.resume: "auto" -> the newest checkpoint under root (or None); "" -> None; else that folder."""
    if resume == "auto":
        return latest_checkpoint(root)
    if not resume:
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: no checkpoint folder {path}")
    return path


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> TrainingState:
    """Read a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    if not (path / _STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {_STATE_FILE})")
    try:
        info = json.loads((path / _STATE_FILE).read_text())
        optimizer = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from e
    model, _ = read_safetensors(path / "model.safetensors")
    ema = read_safetensors(path / "ema.safetensors")[0] if info.get("has_ema") else None
    step = info.pop("step")
    info.pop("has_ema", None)
    return TrainingState(step=step, model=model, optimizer=optimizer, rng=rng, ema=ema, info=info)


# ----------------------------------------------------------------------------------------------------------
# SIGTERM: save at the next step boundary


class StopRequest:
    """Set by SIGTERM (cluster pre-emption, `kill`): the training loop saves and returns at the next update.

    Use as a context manager around the loop; the previous handler comes back on exit. Outside the main thread
    (where Python cannot install signal handlers) it installs nothing and only `request()` sets it.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def request(self, signum: int | None = None, frame=None) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self.request)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
