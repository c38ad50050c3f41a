"""The training loop on tiny models: the loss goes down, kill-and-resume reproduces an uninterrupted run exactly,
SIGTERM saves and stops, LoRA trains only its adapters, and raw images with validation images run end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from PIL import Image

from sana.models.transformer import SanaTransformer
from sana.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from sana.train.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    LoggingConfig,
    LRSchedule,
    ModelConfig,
    OptimConfig,
    OptimizerKind,
    ScheduleConfig,
)
from sana.train.loop import train
from sana.train.model import build_transformer
from sana.weights.io import read_safetensors
from sana.weights.load import load_transformer, save_model
from train_tiny import TINY_ARCH, make_image_folder, save_tiny_autoencoder, save_tiny_text_encoder, tiny_config


class Killed(Exception):
    """Stands for the process dying: no final save happens."""


def _kill_at(n: int):
    def on_step(step, loss):
        if step == n:
            raise Killed

    return on_step


def test_loss_decreases_on_tiny_synthetic_data(tmp_path):
    cfg = tiny_config(tmp_path, schedule=ScheduleConfig(max_steps=60, warmup_steps=5))
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) == 60 and summary["step"] == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5, 61, 5))
    assert {"loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "epoch"} <= set(log[0])
    assert summary["export"] and load_transformer(summary["export"]).config == TINY_ARCH


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    base = tiny_config(
        tmp_path / "a",
        optim=OptimConfig(lr=1e-3, grad_clip=1.0, grad_accum=2, ema_decay=0.9),
        schedule=ScheduleConfig(max_steps=12, warmup_steps=3),
        checkpoint=CheckpointConfig(every_steps=4, keep_last=2),
        data=DataConfig(source=DataSource.SYNTHETIC, resolution=256, batch_size=3, num_workers=0, synthetic_samples=10),
    )
    uninterrupted = train(base)

    killed_cfg = dataclasses.replace(base, output_dir=str(tmp_path / "b"))
    with pytest.raises(Killed):
        train(killed_cfg, on_step=_kill_at(6))  # dies after step 6; the last checkpoint is step 4
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000004"
    resumed = train(killed_cfg)  # resume = "auto"

    assert resumed["start_step"] == 4 and resumed["resumed_from"].endswith("step-00000004")
    assert resumed["losses"] == uninterrupted["losses"][4:]  # bit for bit
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000012")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000012")
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]) and torch.equal(a.ema[key], b.ema[key]), key
    assert a.info == b.info
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000008", "step-00000012"]
    # A finished run resumed again does nothing.
    again = train(killed_cfg)
    assert again["start_step"] == again["step"] == 12 and again["losses"] == []


def test_sigterm_saves_at_the_next_step_and_stops(tmp_path):
    cfg = tiny_config(tmp_path, schedule=ScheduleConfig(max_steps=10, warmup_steps=0))

    def term_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    summary = train(cfg, on_step=term_at_3)
    assert signal.getsignal(signal.SIGTERM) == before
    assert summary["stopped_by_signal"] and summary["export"] is None
    # The signal arrived at the end of step 3: no further update, step 3 saved, the loop returned.
    assert summary["step"] == 3 and latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
    rest = train(cfg)
    assert rest["start_step"] == 3 and rest["step"] == 10 and rest["export"]


def test_lora_trains_only_the_adapters(tmp_path):
    torch.manual_seed(1)
    base = SanaTransformer(TINY_ARCH)
    base_path = save_model(base, tmp_path / "base.safetensors")
    model = ModelConfig(
        init_from=str(base_path), lora_rank=2, lora_alpha=4.0, lora_targets=("attn.qkv", "cross_attn.kv")
    )
    cfg = tiny_config(
        tmp_path / "run",
        model=model,
        optim=OptimConfig(optimizer=OptimizerKind.ADAMW, lr=1e-2, grad_clip=1.0, ema_decay=0.0),
        schedule=ScheduleConfig(max_steps=8, warmup_steps=0, lr_schedule=LRSchedule.COSINE),
        checkpoint=CheckpointConfig(every_steps=4),
    )
    with pytest.raises(Killed):
        train(cfg, on_step=_kill_at(5))
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert sorted(state.model) == sorted(
        f"blocks.{i}.{m}.parametrizations.weight.0.{ab}"
        for i in (0, 1)
        for m in ("attn.qkv", "cross_attn.kv")
        for ab in "AB"
    )
    summary = train(cfg)
    assert summary["start_step"] == 4 and summary["step"] == 8

    merged = load_transformer(summary["export"])
    lora, meta = read_safetensors(tmp_path / "run" / "final" / "lora.safetensors")
    assert meta["sana_lora_rank"] == "2"
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    for key in base_sd:
        module = key.rsplit(".", 1)[0]
        if f"{module}.lora_A" in lora and key.endswith("weight"):
            delta = 2.0 * lora[f"{module}.lora_B"] @ lora[f"{module}.lora_A"]  # alpha / rank = 2
            assert delta.abs().max() > 0
            torch.testing.assert_close(merged_sd[key], base_sd[key] + delta)
        else:
            assert torch.equal(merged_sd[key], base_sd[key]), key  # frozen


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return save_tiny_autoencoder(root / "ae.safetensors"), save_tiny_text_encoder(root / "te")


def test_images_end_to_end_with_validation_and_a_corrupt_image(tmp_path, encoders):
    ae_path, te_path = encoders
    folder = make_image_folder(tmp_path / "images", [(32, 32), (32, 64), (64, 32), (32, 32), (40, 40), (32, 32)])
    data = (folder / "003.png").read_bytes()
    (folder / "003.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut: fails when loaded
    cfg = tiny_config(
        tmp_path / "run",
        model=ModelConfig(arch=TINY_ARCH, autoencoder=str(ae_path), text_encoder=str(te_path), chi=False),
        data=DataConfig(source=DataSource.FOLDER, path=str(folder), resolution=32, batch_size=2, num_workers=1),
        schedule=ScheduleConfig(max_steps=6, warmup_steps=1),
        logging=LoggingConfig(
            every_steps=3,
            backend=LoggingConfig().backend.JSONL,
            progress=False,
            validation_every=3,
            validation_prompts=("a cat", "a red fox in the snow"),
            validation_steps=2,
        ),
    )
    summary = train(cfg)
    assert summary["step"] == 6 and all(map(torch.isfinite, map(torch.tensor, summary["losses"])))
    assert summary["images_skipped"] >= 1  # the cut image, counted each time it was drawn
    assert len(summary["samples"]) == 4
    for path in summary["samples"]:
        with Image.open(path) as im:
            assert im.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-00000003", "step-00000006"]


def test_sigterm_during_a_step_saves_that_step(tmp_path, monkeypatch):
    from sana.train import loop

    calls = []
    real_loss = loop.flow_matching_loss

    def loss_then_term(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during step 3, before its update
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "flow_matching_loss", loss_then_term)
    cfg = tiny_config(tmp_path, schedule=ScheduleConfig(max_steps=10, warmup_steps=0))
    summary = train(cfg)
    assert summary["stopped_by_signal"] and summary["step"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003"]


def test_gradient_checkpointing_does_not_change_the_losses(tmp_path):
    plain = tiny_config(tmp_path / "a", schedule=ScheduleConfig(max_steps=5, warmup_steps=0))
    checkpointed = dataclasses.replace(
        plain,
        output_dir=str(tmp_path / "b"),
        model=dataclasses.replace(plain.model, gradient_checkpointing=True),
    )
    assert build_transformer(checkpointed.model).gradient_checkpointing  # the switch reaches the model
    assert not build_transformer(plain.model).gradient_checkpointing
    assert train(plain)["losses"] == train(checkpointed)["losses"]


def test_export_holds_the_ema_weights_in_diffusers_layout(tmp_path):
    from sana.train.config import ExportLayout

    cfg = tiny_config(
        tmp_path,
        schedule=ScheduleConfig(max_steps=3, warmup_steps=0),
        checkpoint=CheckpointConfig(export_layout=ExportLayout.DIFFUSERS),
    )
    summary = train(cfg)
    exported = load_transformer(summary["export"]).state_dict()
    state = load_checkpoint(summary["checkpoint"])
    assert (tmp_path / "final" / "transformer" / "config.json").exists()
    for key, value in state.ema.items():
        assert torch.equal(exported[key], value), key
    differ = sum(not torch.equal(state.model[k], v) for k, v in state.ema.items())
    assert differ > 0.9 * len(state.ema)  # the EMA, not the live weights
