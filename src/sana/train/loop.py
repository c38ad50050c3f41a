"""The training loop: `train(config) -> summary`, one function that reads top to bottom.

    1. processes, output folder, seeds       5. resume from a checkpoint
    2. models, DDP / FSDP2                   6. logging and the progress bar
    3. data (this process's share)           7. the loop: lr, micro-batches, update, EMA, log, validate, save
    4. optimizer, EMA, the loss's generator  8. final checkpoint, export, summary

All randomness is explicit: the data order and caption choices are functions of (seed, epoch, batch), and the
loss draws sigma, noise and caption dropout from a generator seeded with (seed, step, micro-batch) for every
micro-batch. So a run that is stopped and resumed from a checkpoint computes exactly the losses of an
uninterrupted run (on the CPU; on CUDA up to the non-determinism of its kernels), and N processes with grad_accum
A draw the same batches and noise as one process with grad_accum N x A. SIGTERM saves a checkpoint at the next
update and returns.

Under torchrun (see `sana.train.distributed`) every process runs this function: process r takes micro-batches
r, r + N, ... of each update, the logged loss is the mean over all of them, and rank 0 alone writes files
(config, logs, checkpoints, validation images, the export).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sana.dataclass_io import to_dict
from sana.errors import CheckpointError, ConfigError, SanaError
from sana.lora import save_lora as save_diffusers_lora
from sana.models.transformer import SanaTransformer
from sana.train import distributed
from sana.train.cache import CachedDataset, encode_captions, encode_images
from sana.train.checkpoint import (
    StopRequest,
    TrainingState,
    capture_rng,
    checkpoint_name,
    load_checkpoint,
    restore_rng,
    resume_path,
    save_checkpoint,
)
from sana.train.config import DataSource, ExportLayout, LogBackend, MixedPrecision, TrainConfig, TrainTask
from sana.train.data import BucketBatchSampler, ImageFolderDataset, SyntheticDataset, iterate_batches
from sana.train.distributed import Context
from sana.train.loss import flow_matching_loss
from sana.train.model import (
    build_transformer,
    chi_lines,
    load_autoencoder_for,
    load_text_encoder_for,
    lora_adapters,
    merged_copy,
    save_lora,
)
from sana.train.optim import EMA, build_optimizer, lr_at
from sana.train.webdataset import WebDatasetShards
from sana.weights.io import write_json
from sana.weights.load import save_model

log = logging.getLogger("sana.train")

_LOSS_STREAM = 0x6C6F7373  # "loss": keeps the loss's seeds apart from the data's sample seeds

StepCallback = Callable[[int, float], None]


class TrainingError(SanaError):
    """Training cannot go on (e.g. the loss stayed non-finite): the message says why."""


def train(cfg: TrainConfig, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns a summary (steps, losses of this run, checkpoint, export, counters).

    on_step(step, loss) is called after every optimizer update (after its checkpoint, if one was due). Under
    torchrun every process calls this; it joins the process group from the environment (or uses the one that
    exists) and leaves it at the end.
    """
    if cfg.task is TrainTask.TEXT_ENCODER:  # one-process tasks with their own small loops (sana.train.fit)
        from sana.train.text_model import train_text_encoder

        return train_text_encoder(cfg)
    if cfg.task is TrainTask.AUTOENCODER:
        from sana.train.autoencoder import train_autoencoder

        return train_autoencoder(cfg)
    ctx = distributed.setup(cfg.distributed, cfg.device)
    try:
        return _train(cfg, ctx, on_step)
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: Context, on_step: StepCallback | None) -> dict[str, Any]:
    # ---- 1. Processes (ctx: strategy, rank, device), output folder (rank 0 writes), seeds -----------------
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", to_dict(cfg))
    device = ctx.device
    use_bf16 = cfg.mixed_precision is MixedPrecision.BF16 and device.type == "cuda"
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # DC-AE and Gemma (never trained)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- 2. Models: the transformer (fp32 master weights) and, when needed, the frozen encoders -----------
    # Rank 0 first: it downloads what is missing into the Hugging Face cache, the others then read it there.
    with distributed.main_first(ctx):
        model = build_transformer(cfg.model, torch.Generator().manual_seed(cfg.seed)).to(device)
        raw_images = cfg.data.source in (DataSource.FOLDER, DataSource.WEBDATASET)
        need_encoders = raw_images or cfg.logging.validation_every > 0
        autoencoder = load_autoencoder_for(cfg.model, device, frozen_dtype) if need_encoders else None
        text_encoder = load_text_encoder_for(cfg.model, device, frozen_dtype) if need_encoders else None
    # train_model is what computes the loss: model itself, a DDP wrapper around it, or model sharded in place
    # (FSDP2: its parameters become DTensors, so `trainable` is taken after).
    train_model = distributed.parallelize(model, ctx, cfg.distributed)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    # ---- 3. Data: a dataset indexed by (index, sample_seed), batches from one aspect-ratio bucket each -----
    if raw_images:
        images_class = ImageFolderDataset if cfg.data.source is DataSource.FOLDER else WebDatasetShards
        dataset = images_class(
            cfg.data.path,
            cfg.data.resolution,
            autoencoder.config.spatial_compression,
            cfg.data.clip_threshold,
            cfg.data.clip_temperature,
        )
        null_text, _ = text_encoder.null_embedding()
        if dataset.report.skipped:
            log.warning(
                "skipped %d image(s) of %s: %s", dataset.report.skipped, cfg.data.path, dataset.report.describe()
            )
    elif cfg.data.source is DataSource.CACHE:
        dataset = CachedDataset(cfg.data.path, cfg.data.clip_threshold, cfg.data.clip_temperature)
        _check_cache(dataset.settings, model.config, cfg)
        null_text, _ = dataset.null_embedding()
    else:
        dataset = SyntheticDataset(
            cfg.data.synthetic_samples,
            model.config.in_channels,
            cfg.data.resolution // 32,
            cfg.data.synthetic_text_length,
            model.config.caption_channels,
            seed=cfg.seed,
        )
        null_text, _ = dataset.null_embedding()
    null_text = null_text.to(device)
    # Process r takes batches r, r + N, ... of every epoch.
    sampler = BucketBatchSampler(
        dataset.buckets, cfg.data.batch_size, cfg.seed, cfg.data.drop_last, rank=ctx.rank, world_size=ctx.world_size
    )

    # ---- 4. Optimizer, EMA, and the generator of the loss's sigma / noise / caption dropout ---------------
    # Under FSDP2 the optimizer state and the EMA are sharded like the weights they follow.
    optimizer = build_optimizer(trainable.values(), cfg.optim)
    ema = EMA(trainable, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    loss_generator = torch.Generator(device)  # seeded for every micro-batch from (seed, step, micro-batch)

    # ---- 5. Resume: weights, optimizer, EMA, RNG states and the data position -----------------------------
    # Rank 0 picks the checkpoint; every rank reads it (a file system they share) and keeps its shards of it.
    ckpt_root = out / "checkpoints"
    step, epoch, position = 0, 0, 0
    counters = {"images_seen": 0, "images_skipped": 0, "nan_updates": 0}
    resume_from = distributed.broadcast_object(resume_path(cfg.checkpoint.resume, ckpt_root), ctx)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _load_trained_state(model, trainable, state.model, resume_from)
        distributed.load_optimizer_state(model, optimizer, state.optimizer, list(trainable), ctx)
        if ema is not None:
            if state.ema is None:
                raise CheckpointError(f"{resume_from} has no EMA but optim.ema_decay > 0")
            ema.load_state_dict(distributed.shard_like(state.ema, ema.shadow))
        restore_rng(state.rng)
        step = state.step
        epoch, position = _data_position(state.info, ctx)
        counters.update(state.info["counters"])
        log.info("resumed from %s at step %d", resume_from, step)
    start_step, last_saved = step, (step if resume_from is not None else None)

    # ---- 6. Logging (TensorBoard or JSONL) and the progress bar -------------------------------------------
    logger = MetricLogger(out, cfg.logging.backend, enabled=ctx.is_main)
    bar = _progress_bar(cfg.schedule.max_steps, step, cfg.logging.progress and ctx.is_main)
    losses: list[float] = []
    window = {"time": time.perf_counter(), "steps": 0, "images": 0, "loss": 0.0}
    samples_written: list[str] = []

    # ---- 7. The loop ---------------------------------------------------------------------------------------
    batches = iterate_batches(dataset, sampler, epoch, position, cfg.data.num_workers)
    stop = StopRequest()
    stopping = False  # the ranks' agreed view of SIGTERM (a signal may reach them at different moments)
    try:
        with stop:
            while step < cfg.schedule.max_steps:
                if distributed.any_rank(stop.requested, ctx):
                    stopping = True
                    break
                # 7a. Learning rate of this update (a pure function of the step).
                lr = lr_at(step, cfg.optim.lr, cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # 7b. grad_accum micro-batches; batches whose images all failed to load are skipped. Micro-batch k
                # of process r is micro-batch k N + r of the update: its noise does not depend on N.
                train_model.train()
                optimizer.zero_grad(set_to_none=True)
                step_loss, images, skipped = 0.0, 0, 0
                for k in range(cfg.optim.grad_accum):
                    while True:
                        epoch, position, batch = next(batches)
                        skipped += batch["skipped"]
                        for error in batch["errors"]:
                            log.warning("skipped an image that failed to load: %s", error)
                        if "index" in batch:
                            break
                    if "image" in batch:  # raw images: encode on the fly with the frozen models
                        x0 = encode_images(autoencoder, batch["image"]).to(device)
                        text, mask = encode_captions(text_encoder, batch["caption"], cfg.model.chi)
                    else:  # cached or synthetic features
                        x0, text, mask = batch["latent"].to(device), batch["text"].to(device), batch["mask"]
                    loss_generator.manual_seed(_loss_seed(cfg.seed, step, k * ctx.world_size + ctx.rank))
                    last = k == cfg.optim.grad_accum - 1
                    with distributed.grad_sync(train_model, ctx, last):  # DDP: all-reduce after the last only
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                            loss = flow_matching_loss(
                                train_model,
                                x0,
                                text,
                                mask.to(device),
                                null_text,
                                generator=loss_generator,
                                flow_shift=cfg.loss.flow_shift,
                                logit_mean=cfg.loss.logit_mean,
                                logit_std=cfg.loss.logit_std,
                                caption_dropout=cfg.loss.caption_dropout,
                            )
                        (loss / cfg.optim.grad_accum).backward()
                    step_loss += loss.item() / cfg.optim.grad_accum
                    images += x0.shape[0]
                # Over all processes: the mean loss, the images, and whether SIGTERM arrived during the step.
                loss_sum, images, skipped, stop_votes = distributed.all_reduce_sum(
                    [step_loss, images, skipped, float(stop.requested)], ctx
                )
                step_loss, images = loss_sum / ctx.world_size, int(images)
                counters["images_skipped"] += int(skipped)
                stopping = stop_votes > 0

                # 7c. Update: skip non-finite losses, clip the gradient norm, step, then the EMA.
                if not math.isfinite(step_loss):
                    counters["nan_updates"] += 1
                    log.warning("non-finite loss at step %d: update skipped", step)
                    if counters["nan_updates"] > cfg.optim.max_nan_updates:
                        raise TrainingError(f"{counters['nan_updates']} updates skipped for a non-finite loss")
                    continue
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf  # inf: measure only
                grad_norm = distributed.clip_grad_norm(trainable.values(), max_norm)
                optimizer.step()
                if ema is not None:
                    ema.update(trainable)
                step += 1
                counters["images_seen"] += images
                losses.append(step_loss)

                # 7d. Metrics: the progress bar every update, the log every `logging.every_steps` (rank 0).
                window["steps"] += 1
                window["images"] += images
                window["loss"] += step_loss
                elapsed = max(time.perf_counter() - window["time"], 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{window['images'] / elapsed:.1f}", refresh=False)
                if step % cfg.logging.every_steps == 0 or step == cfg.schedule.max_steps:
                    metrics = {
                        "loss": window["loss"] / window["steps"],
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "steps_per_s": window["steps"] / elapsed,
                        "images_per_s": window["images"] / elapsed,
                        "epoch": epoch,
                        "images_skipped": counters["images_skipped"],
                    }
                    if device.type == "cuda":
                        metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    logger.log(step, metrics)
                    window = {"time": time.perf_counter(), "steps": 0, "images": 0, "loss": 0.0}

                # 7e. Validation images on fixed prompts and seeds (every rank renders, rank 0 saves).
                if cfg.logging.validation_every and step % cfg.logging.validation_every == 0:
                    samples_written += _validate(
                        model, autoencoder, text_encoder, ema, trainable, cfg, step, use_bf16, ctx
                    )

                # 7f. Checkpoint: periodically, and when SIGTERM asked for one.
                periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                if periodic or stopping:
                    _save(ckpt_root, cfg, ctx, step, model, trainable, optimizer, ema, epoch, position, counters)
                    last_saved = step
                if on_step is not None:
                    on_step(step, step_loss)
    finally:
        batches.close()
        bar.close()
        logger.close()

    # ---- 8. Final checkpoint, export of the trained transformer, summary ----------------------------------
    checkpoint = None
    if last_saved != step:
        _save(ckpt_root, cfg, ctx, step, model, trainable, optimizer, ema, epoch, position, counters)
    if step > 0:
        checkpoint = str(ckpt_root / checkpoint_name(step))
    export = None
    if cfg.checkpoint.export and step >= cfg.schedule.max_steps and not stopping:
        export = str(_export(model, ema, trainable, cfg, out / "final", ctx))
    distributed.barrier(ctx)  # every file is written when any rank returns
    return {
        "output_dir": str(out),
        "start_step": start_step,
        "step": step,
        "losses": losses,
        "last_loss": losses[-1] if losses else None,
        "checkpoint": checkpoint,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "export": export,
        "stopped_by_signal": stopping,
        "samples": samples_written,
        "log": str(logger.path),
        "elapsed_s": time.perf_counter() - t_start,
        "strategy": ctx.strategy.value,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        **counters,
    }


# ----------------------------------------------------------------------------------------------------------
# Helpers of the loop (no state of their own beyond what is passed in)


def _loss_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed of the loss's draws (sigma, noise, caption dropout) for one micro-batch of update `step`."""
    return int(np.random.SeedSequence([seed, step, micro_batch, _LOSS_STREAM]).generate_state(1)[0])


def _data_position(info: dict[str, Any], ctx: Context) -> tuple[int, int]:
    """(epoch, position) of this rank from a checkpoint's info. Positions count this rank's batches; a checkpoint
    of another number of processes continues from the same number of batches taken overall in the epoch."""
    world = info.get("world_size", 1)
    if world == ctx.world_size:
        epoch, position = info.get("data", [[info["epoch"], info["position"]]])[ctx.rank]
        return epoch, position
    taken = info["position"] * world
    if taken % ctx.world_size:
        log.warning(
            "the checkpoint was written by %d processes, this run has %d: %d batch(es) of epoch %d are seen again",
            world,
            ctx.world_size,
            taken % ctx.world_size,
            info["epoch"],
        )
    return info["epoch"], taken // ctx.world_size


def _save(
    root: Path, cfg: TrainConfig, ctx: Context, step: int, model, trainable, optimizer, ema, epoch, position, counters
):
    """Every rank: gather the full training state (FSDP2: collectives); rank 0 writes it; everyone waits for it."""
    data = distributed.gather_objects([epoch, position], ctx)  # each rank's place in the data
    state = TrainingState(
        step=step,
        model=distributed.full_state(_trained_state(model, trainable), ctx),
        optimizer=distributed.optimizer_state(model, optimizer, list(trainable), ctx),
        rng=capture_rng(),
        ema=distributed.full_state(ema.state_dict(), ctx) if ema is not None else None,
        info={
            "epoch": epoch,
            "position": position,
            "counters": counters,
            "world_size": ctx.world_size,
            "data": data,
        },
    )
    if ctx.is_main:
        save_checkpoint(root, state, cfg.checkpoint.keep_last)
    distributed.barrier(ctx)


def _trained_state(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trained parameters and the model's buffers (the frozen rest comes from init_from / the seed)."""
    sd = {name: p.detach() for name, p in trainable.items()}
    sd.update({name: b.detach() for name, b in model.named_buffers()})
    return sd


def _load_trained_state(model: nn.Module, trainable: dict[str, nn.Parameter], sd: dict, source: Path) -> None:
    expected = _trained_state(model, trainable)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the checkpoint does not fit the configured model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written with another [model] config?)"
        )
    with torch.no_grad():
        for name, target in expected.items():
            if sd[name].shape != target.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(sd[name].shape)}, expected {target.shape}")
            distributed.copy_full_(target, sd[name])


def _check_cache(settings: dict, arch, cfg: TrainConfig) -> None:
    """A cache must hold features that fit the model and the config."""
    problems = []
    if settings["latent_channels"] != arch.in_channels:
        problems.append(f"{settings['latent_channels']} latent channels, the model takes {arch.in_channels}")
    if settings["text_dim"] != arch.caption_channels:
        problems.append(f"text width {settings['text_dim']}, the model takes {arch.caption_channels}")
    if settings["chi"] != cfg.model.chi:
        problems.append(f"built with chi={settings['chi']}, but model.chi={cfg.model.chi}")
    if settings["resolution"] != cfg.data.resolution:
        problems.append(f"built at resolution {settings['resolution']}, but data.resolution={cfg.data.resolution}")
    if problems:
        raise ConfigError(f"cache {cfg.data.path}: " + "; ".join(problems))


def _validate(model, autoencoder, text_encoder, ema, trainable, cfg: TrainConfig, step: int, use_bf16: bool, ctx):
    """Render the validation prompts (seed validation_seed + i) to OUTPUT_DIR/samples/step-N/NNN.png.

    Every rank renders (an FSDP2 forward is a collective); rank 0 saves the images.
    """
    from sana.pipeline import Pipeline

    pipe = Pipeline(
        model,
        autoencoder,
        text_encoder,
        flow_shift=cfg.loss.flow_shift,
        steps=cfg.logging.validation_steps,
        guidance=cfg.logging.validation_guidance,
        progress=False,
    )
    folder = Path(cfg.output_dir) / "samples" / checkpoint_name(step)
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    use_ema = ema is not None and cfg.logging.validation_use_ema
    size = cfg.data.resolution
    written = []
    model.eval()
    if use_ema:
        ema.swap(trainable)
    try:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            for i, prompt in enumerate(cfg.logging.validation_prompts):
                (image,) = pipe(
                    prompt,
                    height=size,
                    width=size,
                    seed=cfg.logging.validation_seed + i,
                    chi=chi_lines(cfg.model.chi),
                    use_resolution_binning=False,
                )
                path = folder / f"{i:03d}.png"
                if ctx.is_main:
                    image.save(path)
                    written.append(str(path))
    finally:
        distributed.reshard(model)  # FSDP2: no gathered (EMA) weights may outlive the swap back
        if use_ema:
            ema.swap(trainable)
        model.train()
    return written


def _export(model, ema, trainable, cfg: TrainConfig, folder: Path, ctx: Context) -> Path:
    """The trained transformer (EMA weights when kept, LoRA merged) in the configured layout, plus the LoRA.

    Rank 0 writes it; under FSDP2 every rank first helps gather the full weights. Returns the path on every rank.
    """
    diffusers = cfg.checkpoint.export_layout is ExportLayout.DIFFUSERS
    path = folder / "transformer" if diffusers else folder / "transformer.safetensors"
    if not (ctx.is_main or ctx.sharded):
        return path
    if ema is not None:
        ema.swap(trainable)
    try:
        if ctx.sharded:  # a plain copy of the gathered weights (no LoRA under FSDP2)
            full = distributed.full_state(model.state_dict(), ctx)
            if not ctx.is_main:
                return path
            plain = SanaTransformer(model.config)
            plain.load_state_dict(full)
        else:
            plain = merged_copy(model)
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.model.lora_rank:
            save_lora(
                model, folder / "lora.safetensors", cfg.model.lora_rank, cfg.model.lora_alpha or cfg.model.lora_rank
            )
            # The same adapters in diffusers' layout (folder/pytorch_lora_weights.safetensors): Pipeline.load_lora
            save_diffusers_lora(folder, lora_adapters(model), model.config)
        return save_model(plain, path, layout="diffusers" if diffusers else "native")
    finally:
        if ema is not None:
            ema.swap(trainable)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)


class MetricLogger:
    """Scalars to TensorBoard (OUTPUT_DIR/tensorboard) or, without it, to OUTPUT_DIR/log.jsonl (appended)."""

    def __init__(self, out: Path, backend: LogBackend, enabled: bool = True):
        writer_cls = None
        if backend is not LogBackend.JSONL:
            try:
                from torch.utils.tensorboard import SummaryWriter as writer_cls
            except ImportError as e:
                if backend is LogBackend.TENSORBOARD:
                    raise ConfigError(
                        "logging.backend = 'tensorboard' needs the tensorboard package (pip install tensorboard)"
                    ) from e
        self.path = out / "tensorboard" if writer_cls is not None else out / "log.jsonl"
        # Only rank 0 writes; the other processes know the path and write nothing.
        self.writer = writer_cls(str(self.path)) if enabled and writer_cls is not None else None
        self.file = open(self.path, "a", encoding="utf-8") if enabled and writer_cls is None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None and self.file is None:
            return
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        else:
            import json

            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
