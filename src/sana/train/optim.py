"""Optimizers (CAME, AdamW), the learning-rate schedule and the EMA of the weights.

CAME (Luo et al. 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization", Algorithm 1) is
Adafactor's factored second moment plus a factored "instability" (confidence) statistic that rescales the
momentum. Sana trains with it (reference section 9.4): betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16),
clip_threshold 1.0, no weight decay, factored statistics for Linear and 1x1-conv weights, full ones for 3x3
depthwise convolutions and vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from sana.train.config import LRSchedule, OptimConfig, OptimizerKind, ScheduleConfig

CAME_BETAS = (0.9, 0.999, 0.9999)
CAME_EPS = (1e-30, 1e-16)
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = (1e-10,)


def factored_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of the matrix whose second moment CAME factors, or None for a full second moment.

    Linear weights (out, in) and 1x1 convolutions (out, in, 1, 1) are factored; vectors, 3x3 (depthwise)
    convolutions and other shapes keep a full moment, as Sana's CAMEWrapper.
    """
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 1:
        return shape[0], shape[1]
    return None


def _approx_rsqrt(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(row col^T / mean(row)): the inverse root of the rank-1 moment estimate (Algorithm 1, lines 5, 12)."""
    r = (row / row.mean()).rsqrt()  # (n,)
    return r[:, None] * col.rsqrt()[None, :]  # (n, m)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / math.sqrt(x.numel())


class CAME(torch.optim.Optimizer):
    """CAME, Algorithm 1 of Luo et al. 2023 (statistics in fp32, or fp64 for fp64 parameters).

    For a factored (n, m) gradient G:
        r = b2 r + (1 - b2) mean_cols(G^2 + eps1);   c = b2 c + (1 - b2) mean_rows(G^2 + eps1)
        U = G / sqrt(r c^T / mean(r));               U /= max(1, RMS(U) / clip_threshold)
        m = b1 m + (1 - b1) U
        R = b3 R + (1 - b3) mean_cols((U - m)^2 + eps2);   C likewise over rows
        theta -= lr m / sqrt(R C^T / mean(R))
    Unfactored parameters keep a full v = b2 v + (1 - b2)(G^2 + eps1) and step by lr m (no confidence term), as
    the authors' implementation. Weight decay is decoupled: theta -= lr wd theta.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float, float] = CAME_BETAS,
        eps: tuple[float, float] = CAME_EPS,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 3 or any(not 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be three values in [0, 1), got {betas}")
        if len(eps) != 2 or any(e < 0 for e in eps):
            raise ValueError(f"eps must be two values >= 0, got {eps}")
        if clip_threshold <= 0 or weight_decay < 0:
            raise ValueError(f"clip_threshold={clip_threshold} must be > 0, weight_decay={weight_decay} >= 0")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            eps1, eps2 = group["eps"]
            lr, d = group["lr"], group["clip_threshold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CAME does not support sparse gradients")
                fshape = factored_shape(p.shape)
                work = torch.float64 if p.dtype == torch.float64 else torch.float32  # statistics' dtype
                grad = p.grad.to(work)
                grad = grad.reshape(fshape) if fshape else grad  # (n, m) for factored parameters
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    if fshape:
                        n, m = fshape
                        state["exp_avg_sq_row"] = grad.new_zeros(n)
                        state["exp_avg_sq_col"] = grad.new_zeros(m)
                        state["exp_avg_res_row"] = grad.new_zeros(n)
                        state["exp_avg_res_col"] = grad.new_zeros(m)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1

                # Second moment (lines 3-5) and the normalised, clipped update (lines 6-7).
                sq = grad * grad + eps1
                if fshape:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2).add_(sq.mean(dim=1), alpha=1 - beta2)
                    col.mul_(beta2).add_(sq.mean(dim=0), alpha=1 - beta2)
                    update = grad * _approx_rsqrt(row, col)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2).add_(sq, alpha=1 - beta2)
                    update = grad * v.rsqrt()
                update.div_((_rms(update) / d).clamp(min=1.0))

                # First moment (line 8).
                exp_avg = state["exp_avg"]
                exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)

                # Confidence: factored moment of the instability (U - m)^2 (lines 9-12), then the step (line 13).
                if fshape:
                    res = (update - exp_avg).square_().add_(eps2)
                    res_row, res_col = state["exp_avg_res_row"], state["exp_avg_res_col"]
                    res_row.mul_(beta3).add_(res.mean(dim=1), alpha=1 - beta3)
                    res_col.mul_(beta3).add_(res.mean(dim=0), alpha=1 - beta3)
                    update = exp_avg * _approx_rsqrt(res_row, res_col)
                else:
                    update = exp_avg

                target = p if p.dtype == work else p.to(work)
                if group["weight_decay"]:
                    target.mul_(1 - lr * group["weight_decay"])
                target.add_(update.view(p.shape), alpha=-lr)
                if target is not p:
                    p.copy_(target)
        return loss


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """CAME or AdamW over `params` with the config's hyper-parameters (empty betas/eps: the defaults)."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.optimizer is OptimizerKind.CAME:
        return CAME(
            params,
            lr=cfg.lr,
            betas=cfg.betas or CAME_BETAS,
            eps=cfg.eps or CAME_EPS,
            clip_threshold=cfg.clip_threshold,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer is OptimizerKind.ADAMW:
        return torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=cfg.betas or ADAMW_BETAS,
            eps=(cfg.eps or ADAMW_EPS)[0],
            weight_decay=cfg.weight_decay,
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_at(step: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate of update `step` (0-based): step / warmup * lr during the warmup (diffusers' convention),
    then constant, or lr (min + (1 - min)(1 + cos(pi p)) / 2) with p = (step - warmup) / (max_steps - warmup)."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * step / warmup
    if schedule.lr_schedule is LRSchedule.CONSTANT:
        return base_lr
    if schedule.lr_schedule is LRSchedule.COSINE:
        progress = min(1.0, (step - warmup) / max(1, schedule.max_steps - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return base_lr * (schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * cosine)
    raise ValueError(f"unknown learning-rate schedule {schedule.lr_schedule!r}")


class EMA:
    """Exponential moving average of named parameters: shadow = decay shadow + (1 - decay) param (fp32)."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor]) -> None:
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - self.decay
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(sd)), sorted(set(sd) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the parameters: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, value in sd.items():
            if value.shape != self.shadow[name].shape:
                raise KeyError(f"EMA {name}: shape {tuple(value.shape)}, expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def swap(self, params: Mapping[str, torch.Tensor]) -> None:
        """Exchange the shadow and the live values in place (call twice to undo)."""
        for name, p in params.items():
            live = p.detach().float().clone()
            p.copy_(self.shadow[name])
            self.shadow[name] = live
