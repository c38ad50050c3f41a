"""The loop shared by the one-process tasks (`task = "text_encoder"` and `"autoencoder"`): `fit(...)`.

A task gives a model, a loss of (model, batch) and a `StepData` whose batch k is a pure function of (seed, k); this
module does the rest as the transformer loop does: learning-rate schedule, bf16 autocast, gradient accumulation and
clipping, EMA, the progress bar and metric log, atomic checkpoints keeping the last K, resume (weights, optimizer,
EMA, RNG, step: the data position is the step itself), SIGTERM saving before exit, and the final export (with
the EMA weights when one is kept).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sana.dataclass_io import to_dict
from sana.errors import CheckpointError
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
from sana.train.config import MixedPrecision, TrainConfig
from sana.train.loop import MetricLogger, TrainingError, _progress_bar
from sana.train.optim import EMA, build_optimizer, lr_at
from sana.weights.io import write_json

log = logging.getLogger("sana.train")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
ExportFn = Callable[[nn.Module, Path], Path]


def step_rng(seed: int, step: int, micro_batch: int, stream: int) -> np.random.Generator:
    """The generator of one micro-batch's draws: a function of (seed, step, micro-batch, stream) alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, micro_batch, stream]))


class StepData(Dataset):
    """Item k = the micro-batches of update k (a list of grad_accum batches from `make(step, micro_batch)`).

    A DataLoader over it with `num_workers` processes prepares the next updates while the GPU trains; resuming at
    step s is iterating from s.
    """

    def __init__(self, make: Callable[[int, int], Any], grad_accum: int):
        self.make, self.grad_accum = make, grad_accum

    def __len__(self) -> int:  # not used for sampling: indices come from `batches`
        return 2**62

    def __getitem__(self, step: int) -> list[Any]:
        return [self.make(step, k) for k in range(self.grad_accum)]


def batches(data: StepData, start: int, stop: int, num_workers: int) -> Iterator[list[Any]]:
    """The micro-batches of updates start .. stop - 1, in order (prefetched by `num_workers` processes)."""
    if num_workers == 0:
        return (data[step] for step in range(start, stop))
    loader = DataLoader(
        data,
        sampler=range(start, stop),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    data: StepData,
    loss_fn: LossFn,
    export_fn: ExportFn,
    device: torch.device,
    items_of: Callable[[Any], int],
) -> dict[str, Any]:
    """Train `model` (already on `device`) on `data` with `loss_fn`; write checkpoints and the export under
    cfg.output_dir; return a summary. `items_of(batch)` counts a micro-batch's samples (for images/s)."""
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    use_bf16 = cfg.mixed_precision is MixedPrecision.BF16 and device.type == "cuda"

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(trainable.values(), cfg.optim)
    ema = EMA(trainable, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

    ckpt_root = out / "checkpoints"
    step, counters = 0, {"items_seen": 0, "nan_updates": 0}
    resume_from = resume_path(cfg.checkpoint.resume, ckpt_root)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _load_weights(model, state.model, resume_from)
        optimizer.load_state_dict(state.optimizer)
        if ema is not None:
            if state.ema is None:
                raise CheckpointError(f"{resume_from} has no EMA but optim.ema_decay > 0")
            ema.load_state_dict(state.ema)
        restore_rng(state.rng)
        step = state.step
        counters.update(state.info.get("counters", {}))
        log.info("resumed from %s at step %d", resume_from, step)
    start_step, last_saved = step, (step if resume_from is not None else None)

    logger = MetricLogger(out, cfg.logging.backend)
    bar = _progress_bar(cfg.schedule.max_steps, step, cfg.logging.progress)
    losses: list[float] = []
    window = {"time": time.perf_counter(), "steps": 0, "items": 0, "loss": 0.0}
    stream = batches(data, step, cfg.schedule.max_steps, cfg.data.num_workers)
    stopping = False

    def save() -> None:
        state = TrainingState(
            step=step,
            model=_unshared(model.state_dict()),
            optimizer=optimizer.state_dict(),
            rng=capture_rng(),
            ema=ema.state_dict() if ema is not None else None,
            info={"counters": counters, "task": cfg.task.value},
        )
        save_checkpoint(ckpt_root, state, cfg.checkpoint.keep_last)

    try:
        with StopRequest() as stop:
            while step < cfg.schedule.max_steps:
                if stop.requested:
                    stopping = True
                    break
                lr = lr_at(step, cfg.optim.lr, cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                optimizer.zero_grad(set_to_none=True)
                step_loss, items = 0.0, 0
                for batch in next(stream):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss = loss_fn(model, batch)
                    (loss / cfg.optim.grad_accum).backward()
                    step_loss += loss.item() / cfg.optim.grad_accum
                    items += items_of(batch)
                if not math.isfinite(step_loss):
                    counters["nan_updates"] += 1
                    log.warning("non-finite loss at step %d: update skipped", step)
                    if counters["nan_updates"] > cfg.optim.max_nan_updates:
                        raise TrainingError(f"{counters['nan_updates']} updates skipped for a non-finite loss")
                    step += 1  # the batch of this step is consumed: move on (a pure function of the step)
                    continue
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trainable.values()), max_norm))
                optimizer.step()
                if ema is not None:
                    ema.update(trainable)
                step += 1
                counters["items_seen"] += items
                losses.append(step_loss)

                window["steps"] += 1
                window["items"] += items
                window["loss"] += step_loss
                elapsed = max(time.perf_counter() - window["time"], 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", items_s=f"{window['items'] / elapsed:.1f}", refresh=False)
                if step % cfg.logging.every_steps == 0 or step == cfg.schedule.max_steps:
                    metrics = {
                        "loss": window["loss"] / window["steps"],
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "steps_per_s": window["steps"] / elapsed,
                        "items_per_s": window["items"] / elapsed,
                    }
                    if device.type == "cuda":
                        metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    logger.log(step, metrics)
                    window = {"time": time.perf_counter(), "steps": 0, "items": 0, "loss": 0.0}
                if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or stop.requested:
                    save()
                    last_saved = step
                    stopping = stop.requested
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        bar.close()
        logger.close()

    if step > 0 and last_saved != step:
        save()
    export = None
    if cfg.checkpoint.export and step >= cfg.schedule.max_steps and not stopping:
        model.eval()
        if ema is not None:
            ema.swap(trainable)
        try:
            export = str(export_fn(model, out / "final"))
        finally:
            if ema is not None:
                ema.swap(trainable)
    return {
        "output_dir": str(out),
        "task": cfg.task.value,
        "start_step": start_step,
        "step": step,
        "losses": losses,
        "last_loss": losses[-1] if losses else None,
        "checkpoint": str(ckpt_root / checkpoint_name(step)) if step > 0 else None,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "export": export,
        "stopped_by_signal": stopping,
        "log": str(logger.path),
        "elapsed_s": time.perf_counter() - t_start,
        **counters,
    }


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied embeddings) copied: safetensors stores each once."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the checkpoint does not fit the configured model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written with another [model] config?)"
        )
    for name, value in sd.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(sd)
