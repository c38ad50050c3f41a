"""`sana train` tasks "text_encoder" and "autoencoder" (the one-process loop of sana.train.fit) and `sana assemble`:
configs rejected with the reason, losses that decrease, exact kill-and-resume, exports that load through the same
paths as released models, and an assembled pipeline that generates."""

from __future__ import annotations

import json

import pytest
import torch

from sana.assemble import assemble_pipeline
from sana.errors import ConfigError, SanaError
from sana.models.text_encoder import DEFAULT_CHI, TextEncoder
from sana.shapes import generate_dataset
from sana.train.config import config_from_dict
from sana.train.loop import train
from sana.weights.load import load_autoencoder

TEXT_ARCH = {
    "vocab_size": 320,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
    "intermediate_size": 64,
}
AE_ARCH = {
    "latent_channels": 4,
    "widths": [8, 16, 16],
    "encoder_depths": [1, 1, 1],
    "decoder_depths": [1, 1, 1],
    "encoder_block_types": ["res", "res", "vit"],
    "decoder_block_types": ["res", "res", "vit"],
    "encoder_qkv_multiscales": [[], [], [5]],
    "decoder_qkv_multiscales": [[], [], [5]],
    "head_dim": 8,
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    generate_dataset(root, 24, 64, seed=3, workers=1, progress=False)
    return root


def _cfg(task: str, out, images, **sections):
    table = {
        "task": task,
        "output_dir": str(out),
        "device": "cpu",
        "mixed_precision": "no",
        "data": {
            "source": "folder",
            "path": str(images),
            "batch_size": 4,
            "num_workers": 0,
            **sections.pop("data", {}),
        },
        "optim": {"optimizer": "adamw", "lr": 3e-3, "grad_clip": 1.0, "ema_decay": 0.0, **sections.pop("optim", {})},
        "schedule": {"max_steps": 12, "warmup_steps": 0, **sections.pop("schedule", {})},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"every_steps": 4, "backend": "jsonl", "progress": False},
        **sections,
    }
    return config_from_dict(table)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"task": "text_encoder", "data": {"path": "x"}}, r"needs a \[model.text_arch\]"),
        ({"task": "autoencoder", "data": {"path": "x"}}, r"needs a \[model.autoencoder_arch\]"),
        (
            {
                "task": "autoencoder",
                "model": {"preset": "sana-600m-1024", "autoencoder_arch": {}},
                "data": {"path": "x"},
            },
            "are for task",
        ),
        ({"task": "text_encoder", "model": {"text_arch": TEXT_ARCH}, "data": {"source": "synthetic"}}, "image folder"),
        (
            {
                "task": "text_encoder",
                "model": {"text_arch": TEXT_ARCH},
                "data": {"path": "x"},
                "distributed": {"strategy": "ddp"},
            },
            "one process",
        ),
        (
            {"task": "text_encoder", "model": {"text_arch": {**TEXT_ARCH, "num_kv_heads": 3}}, "data": {"path": "x"}},
            "multiple",
        ),
        ({"task": "nope"}, "task"),
        ({"model": {}}, "give `preset`"),
    ],
)
def test_task_configs_rejected_with_reason(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


@pytest.fixture(scope="module")
def text_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("te") / "run"
    cfg = _cfg("text_encoder", out, shapes, model={"text_arch": TEXT_ARCH}, schedule={"max_steps": 40})
    return train(cfg), out


def test_text_encoder_learns_and_exports_a_text_encoder(text_run):
    summary, out = text_run
    losses = summary["losses"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    te = TextEncoder.from_pretrained(out / "final")  # tokenizer/ + text_encoder/: the released models' path
    assert te.tokenizer.bos_token_id == 2 and te.tokenizer.pad_token_id == 0
    assert te.tokenizer("a red circle").input_ids[0] == 2  # BOS prepended, as Gemma's
    embeds, mask = te.encode(["a red circle left of a blue star"], chi=DEFAULT_CHI)
    assert embeds.shape == (1, 300, TEXT_ARCH["hidden_size"]) and torch.isfinite(embeds).all()
    assert 3 < int(mask.sum()) < 40  # BOS + the prompt's tokens after the CHI


def test_fit_resume_continues_the_same_losses(shapes, tmp_path):
    whole = train(_cfg("text_encoder", tmp_path / "a", shapes, model={"text_arch": TEXT_ARCH}))
    first = train(
        _cfg("text_encoder", tmp_path / "b", shapes, model={"text_arch": TEXT_ARCH}, schedule={"max_steps": 8})
    )
    assert first["export"] is not None
    rest = train(_cfg("text_encoder", tmp_path / "b", shapes, model={"text_arch": TEXT_ARCH}))
    assert rest["start_step"] == 8
    assert first["losses"] + rest["losses"] == pytest.approx(whole["losses"], rel=1e-6)


@pytest.fixture(scope="module")
def ae_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    cfg = _cfg(
        "autoencoder",
        out,
        shapes,
        model={"autoencoder_arch": AE_ARCH},
        data={"resolution": 32, "holdout": 4},
        schedule={"max_steps": 30},
        optim={"ema_decay": 0.9},
    )
    return train(cfg), out


def test_autoencoder_learns_and_exports_scaled_dcae(ae_run):
    summary, out = ae_run
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["holdout_images"] == 4 and metrics["holdout_psnr_db"] == pytest.approx(summary["holdout_psnr_db"])
    ae = load_autoencoder(out / "final" / "vae")
    assert ae.config.scaling_factor == pytest.approx(1.0 / metrics["latent_std"])
    z = ae.encode(torch.zeros(1, 3, 32, 32))
    assert z.shape == (1, 4, 8, 8)


def test_assembled_pipeline_generates(text_run, ae_run, tmp_path):
    from sana.models.transformer import SanaTransformer, TransformerConfig
    from sana.pipeline import Pipeline
    from sana.weights.load import save_model

    arch = TransformerConfig(
        hidden_size=32, depth=2, linear_head_dim=8, cross_heads=2, in_channels=4, out_channels=4,
        caption_channels=TEXT_ARCH["hidden_size"], sample_size=8, patch_size=1,
    )  # fmt: skip
    save_model(SanaTransformer(arch), tmp_path / "t.safetensors")
    out = assemble_pipeline(
        tmp_path / "t.safetensors", ae_run[1] / "final", text_run[1] / "final", tmp_path / "pipe", flow_shift=1.0
    )
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == 1.0 and (out / "model_index.json").is_file()
    pipe = Pipeline.from_pretrained(out, device="cpu", progress=False)
    assert pipe.flow_shift == 1.0 and pipe.default_size == 256
    (image,) = pipe("a red circle", height=32, width=32, steps=2, seed=0)
    assert image.size == (32, 32)
    with pytest.raises(SanaError, match="exists"):
        assemble_pipeline(tmp_path / "t.safetensors", ae_run[1] / "final", text_run[1] / "final", out)
    wrong = TransformerConfig(**{**arch.__dict__, "caption_channels": 48})
    save_model(SanaTransformer(wrong), tmp_path / "w.safetensors")
    with pytest.raises(SanaError, match="caption_channels"):
        assemble_pipeline(tmp_path / "w.safetensors", ae_run[1] / "final", text_run[1] / "final", tmp_path / "p2")
    assert not (tmp_path / "p2").exists()
