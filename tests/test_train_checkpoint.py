"""Training checkpoints: round trip, keep-last-K, atomic writes (never a torn checkpoint), RNG states, SIGTERM."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from sana.errors import CheckpointError
from sana.train import checkpoint as ckpt
from sana.train.checkpoint import (
    StopRequest,
    TrainingState,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def _state(step: int, value: float = 0.0) -> TrainingState:
    p = torch.nn.Parameter(torch.full((3, 2), value))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    return TrainingState(
        step=step,
        model={"w": p.detach().clone()},
        optimizer=opt.state_dict(),
        rng=capture_rng({"loss": torch.Generator().manual_seed(step)}),
        ema={"w": torch.full((3, 2), value + 0.5)},
        info={"epoch": 1, "position": step, "counters": {"images_seen": 4 * step}},
    )


def test_round_trip(tmp_path):
    state = _state(7, 1.0)
    path = save_checkpoint(tmp_path, state)
    assert path.name == "step-00000007"
    back = load_checkpoint(path)
    assert back.step == 7 and back.info == state.info
    assert torch.equal(back.model["w"], state.model["w"]) and torch.equal(back.ema["w"], state.ema["w"])
    assert back.optimizer["state"][0]["exp_avg"].equal(state.optimizer["state"][0]["exp_avg"])
    g = torch.Generator()
    restore_rng(back.rng, {"loss": g})
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())


def test_keep_last_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, _state(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert latest_checkpoint(tmp_path).name == "step-00000040"
    assert latest_checkpoint(tmp_path / "none") is None


def test_failure_mid_write_leaves_no_torn_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(10, 1.0))
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(str(path))
        if str(path).endswith("rng.pt"):  # after model, EMA and optimizer were written
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(20, 2.0))
    assert any(c.endswith("optimizer.pt") for c in calls)
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    # Nothing of step 20 is visible; step 10 is intact and is still the latest.
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path)).model["w"], _state(10, 1.0).model["w"])


def test_failure_while_replacing_the_same_step_keeps_the_old_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(10, 1.0))

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, _state(10, 5.0))
    assert torch.equal(load_checkpoint(tmp_path / "step-00000010").model["w"], _state(10, 1.0).model["w"])


def test_a_crashed_save_is_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, _state(10))
    # What a process killed mid-save leaves: a hidden temporary folder, and a step folder without state.json.
    torn = tmp_path / ".tmp-step-00000020-deadbeef"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    no_state = tmp_path / "step-00000030"
    no_state.mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    with pytest.raises(CheckpointError, match="not a complete"):
        load_checkpoint(no_state)
    save_checkpoint(tmp_path, _state(40))
    assert not torn.exists()
    assert latest_checkpoint(tmp_path).name == "step-00000040"


def test_rng_capture_and_restore_all_sources():
    g = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng({"loss": g})
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    restore_rng(state, {"loss": g})
    second = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    with pytest.raises(CheckpointError, match="other"):
        restore_rng(state, {"other": torch.Generator()})


def test_sigterm_sets_the_stop_request_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
