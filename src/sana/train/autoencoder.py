"""`task = "autoencoder"`: a DC-AE trained to reconstruct the images of a folder.

    loss = mean |x' - x| + gradient_weight mean |d x' - d x| + l2_weight mean (x' - x)^2,   x' = decode(encode(x))

with d the horizontal and vertical pixel differences (a cheap edge term that keeps outlines sharp), on square
crops of data.resolution (each image resized to cover the square and centre-cropped, as `load_image` does). The
last `data.holdout` images of the folder are never trained on: at the end their reconstruction PSNR is measured
and the latent scale is set so that the scaled latents have unit standard deviation (DC-AE's `scaling_factor`,
0.41407 for the released f32c32). The export, OUTPUT_DIR/final/vae/, is a diffusers-layout AutoencoderDC folder
that `sana.load_autoencoder` and diffusers read; OUTPUT_DIR/final/metrics.json holds the PSNR.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sana.errors import ConfigError
from sana.models.dcae import DCAE
from sana.train.config import TrainConfig
from sana.train.data import IMAGE_ERRORS, DataError, Record, load_image, scan_folder
from sana.train.fit import StepData, fit, step_rng
from sana.train.model import resolve_device
from sana.weights.load import load_autoencoder, save_model

log = logging.getLogger("sana.train")

_STREAM = 0x616500  # "ae": the images drawn for each step
_MAX_RETRIES = 100


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, gradient_weight: float, l2_weight: float) -> torch.Tensor:
    """|x' - x| + gradient_weight |d x' - d x| + l2_weight (x' - x)^2, each a mean over pixels, in fp32."""
    x_hat, x = x_hat.float(), x.float()
    diff = x_hat - x
    loss = diff.abs().mean()
    if gradient_weight:
        dy = (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean()
        dx = (diff[..., :, 1:] - diff[..., :, :-1]).abs().mean()
        loss = loss + gradient_weight * (dx + dy)
    if l2_weight:
        loss = loss + l2_weight * diff.square().mean()
    return loss


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale after clamping)."""
    a = (x_hat.float().clamp(-1, 1) + 1) / 2
    b = (x.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


class ImageBatches:
    """Micro-batch (step, k): `batch_size` images drawn uniformly (with replacement) from the training records by
    step_rng(seed, step, k); an image that fails to load is replaced by another draw and counted."""

    def __init__(self, records: list[Record], resolution: int, batch_size: int, seed: int):
        self.records, self.size, self.batch_size, self.seed = records, (resolution, resolution), batch_size, seed

    def __call__(self, step: int, k: int) -> dict[str, Any]:
        rng = step_rng(self.seed, step, k, _STREAM)
        images, errors = [], []
        while len(images) < self.batch_size:
            record = self.records[int(rng.integers(len(self.records)))]
            try:
                images.append(load_image(record.image, self.size))
            except IMAGE_ERRORS as e:
                errors.append(f"{record.image}: {type(e).__name__}: {e}")
                if len(errors) > _MAX_RETRIES:
                    raise DataError(f"more than {_MAX_RETRIES} images failed to load: {errors[-3:]}") from e
        return {"image": torch.stack(images), "errors": errors}


@torch.no_grad()
def measure(model: DCAE, records: list[Record], resolution: int, batch_size: int, device: torch.device):
    """(mean PSNR in dB, std of the raw latents) over `records` (images that fail to load are skipped)."""
    scores, sum_, sq, n = [], 0.0, 0.0, 0
    for start in range(0, len(records), batch_size):
        images = []
        for r in records[start : start + batch_size]:
            try:
                images.append(load_image(r.image, (resolution, resolution)))
            except IMAGE_ERRORS:
                continue
        if not images:
            continue
        x = torch.stack(images).to(device)
        z = model.encode(x).float()
        scores.append(psnr(model.decode(z), x).cpu())
        sum_, sq, n = sum_ + z.sum().item(), sq + z.square().sum().item(), n + z.numel()
    if not scores:
        raise DataError("no held-out image could be loaded")
    mean = sum_ / n
    return float(torch.cat(scores).mean()), math.sqrt(max(sq / n - mean * mean, 1e-12))


def train_autoencoder(cfg: TrainConfig) -> dict[str, Any]:
    """Train the DC-AE of [model.autoencoder_arch] (or continue `init_from`) on data.path; export to
    OUTPUT_DIR/final/vae with the measured scaling factor and the held-out PSNR."""
    device = resolve_device(cfg.device)
    records, report = scan_folder(cfg.data.path)
    if report.skipped:
        log.warning("skipped %d file(s) of %s: %s", report.skipped, cfg.data.path, report.describe())
    if len(records) <= cfg.data.holdout:
        raise DataError(f"{cfg.data.path}: {len(records)} image(s), not more than data.holdout={cfg.data.holdout}")
    train_records = records[: len(records) - cfg.data.holdout]
    holdout = records[len(records) - cfg.data.holdout :]
    torch.manual_seed(cfg.seed)
    if cfg.model.init_from:
        model = load_autoencoder(cfg.model.init_from, dtype=torch.float32)
    elif cfg.model.autoencoder_arch is not None:
        model = DCAE(cfg.model.autoencoder_arch)
    else:
        raise ConfigError('task "autoencoder" needs a [model.autoencoder_arch] table or `init_from`')
    spatial = model.config.spatial_compression
    if cfg.data.resolution % spatial:
        raise ConfigError(f"data.resolution={cfg.data.resolution} must be a multiple of {spatial} for this DC-AE")
    model = model.to(device).train()
    data = StepData(
        ImageBatches(train_records, cfg.data.resolution, cfg.data.batch_size, cfg.seed), cfg.optim.grad_accum
    )
    metrics: dict[str, float] = {}

    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        for error in batch["errors"]:
            log.warning("skipped an image that failed to load: %s", error)
        x = batch["image"].to(device, non_blocking=True)
        return reconstruction_loss(m.decode(m.encode(x)), x, cfg.loss.gradient_weight, cfg.loss.l2_weight)

    def export(trained: nn.Module, folder: Path) -> Path:
        value, std = measure(trained, holdout, cfg.data.resolution, cfg.data.batch_size, device)
        metrics.update(holdout_psnr_db=value, latent_std=std, holdout_images=len(holdout))
        log.info("held-out PSNR %.2f dB over %d images; latent std %.4f", value, len(holdout), std)
        scaled = DCAE(dataclasses.replace(trained.config, scaling_factor=1.0 / std))
        scaled.load_state_dict(trained.state_dict())
        folder.mkdir(parents=True, exist_ok=True)
        save_model(scaled, folder / "vae", layout="diffusers")
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return folder

    summary = fit(cfg, model, data, loss_fn, export, device, lambda b: int(b["image"].shape[0]))
    summary.update(metrics)
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    return summary
