"""Tiny models and data for the training tests: a 3-stage DC-AE (f = 4), a 2-layer Gemma-2 text encoder with a
tokenizer trained here (32 wide), image folders with captions, and config builders. No Hub access."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana.models.dcae import DCAE, BlockType, DCAEConfig
from sana.models.transformer import TransformerConfig
from sana.train.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    LogBackend,
    LoggingConfig,
    LossConfig,
    MixedPrecision,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from sana.weights.load import save_model

R, V = BlockType.RES, BlockType.VIT
TINY_AE = DCAEConfig(
    latent_channels=8,
    widths=(8, 16, 16),
    encoder_depths=(1, 1, 1),
    decoder_depths=(1, 1, 1),
    encoder_block_types=(R, R, V),
    decoder_block_types=(R, R, V),
    encoder_qkv_multiscales=((), (), (5,)),
    decoder_qkv_multiscales=((), (), (5,)),
    head_dim=8,
)
TINY_ARCH = TransformerConfig(
    hidden_size=32,
    depth=2,
    linear_head_dim=8,
    cross_heads=2,
    in_channels=8,
    out_channels=8,
    caption_channels=32,
    sample_size=8,
)


def save_tiny_autoencoder(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model(DCAE(TINY_AE), path)


def save_tiny_text_encoder(folder: Path, seed: int = 0) -> Path:
    """A folder with tokenizer/ and text_encoder/ that TextEncoder.from_pretrained reads."""
    from transformers import Gemma2Model

    from test_text_encoder import _gemma_config, _train_tokenizer

    torch.manual_seed(seed)
    tokenizer = _train_tokenizer()
    model = Gemma2Model(_gemma_config(len(tokenizer))).eval()
    tokenizer.save_pretrained(folder / "tokenizer")
    model.save_pretrained(folder / "text_encoder")
    return folder


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A smooth random RGB image (PNG or JPEG by suffix)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(path)
    return path


def make_image_folder(root: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None) -> Path:
    """Images NNN.png of the given (height, width) with NNN.txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        write_image(root / f"{i:03d}.png", h, w, seed=i)
        text = captions[i % len(captions)] if captions else f"a picture number {i}"
        (root / f"{i:03d}.txt").write_text(text)
    return root


def write_json_captions(path: Path, captions, clip_scores=None) -> None:
    data = {"captions": captions}
    if clip_scores is not None:
        data["clip_scores"] = clip_scores
    path.write_text(json.dumps(data))


def tiny_config(output_dir: Path, **sections) -> TrainConfig:
    """The tiny synthetic run of configs/train/tiny.toml, with sections replaced by keyword (e.g. data=...)."""
    base = TrainConfig(
        output_dir=str(output_dir),
        seed=0,
        device="cpu",
        mixed_precision=MixedPrecision.NO,
        model=ModelConfig(arch=TINY_ARCH),
        data=DataConfig(source=DataSource.SYNTHETIC, resolution=256, batch_size=4, num_workers=0),
        loss=LossConfig(),
        optim=OptimConfig(lr=1e-3, grad_clip=1.0, ema_decay=0.99),
        schedule=ScheduleConfig(max_steps=20, warmup_steps=2),
        checkpoint=CheckpointConfig(every_steps=0, keep_last=0),
        logging=LoggingConfig(every_steps=5, backend=LogBackend.JSONL, progress=False),
    )
    return dataclasses.replace(base, **sections)
