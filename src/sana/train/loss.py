"""The rectified-flow training loss of Sana (reference section 5), with its timestep density and caption dropout.

x_t = (1 - sigma) x0 + sigma noise (sigma = 0 data, 1 noise); the model predicts the velocity v = noise - x0.
Flow times are floats in [0, 1]. The original draws an integer index floor(1000 u) and feeds the model
floor(1000 sigma'); here sigma is continuous and the model sees the same sigma that made x_t (it scales it by
1000 itself), so the 1000 levels the samplers use are all covered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift: sigma' = s sigma / (1 + (s - 1) sigma) (Esser et al. 2024, eq. 23)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    batch: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch,) flow times: shift(sigmoid(N(mean, std))), the logit-normal density of SD3 section 3.1, shifted."""
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    return shift_sigmas(u, shift)


def drop_captions(
    text: torch.Tensor, null_text: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each caption (B, L, D) by the null embedding (1, L, D) with probability p.

    Returns (text, dropped (B,) bool). The caller keeps the captions' masks, as the reference does.
    """
    B = text.shape[0]
    dropped = torch.rand(B, generator=generator, device=text.device) < p  # (B,)
    null_text = null_text.to(device=text.device, dtype=text.dtype).expand_as(text)
    return torch.where(dropped[:, None, None], null_text, text), dropped


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    null_text: torch.Tensor,
    generator: torch.Generator | None = None,
    flow_shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    caption_dropout: float = 0.1,
) -> torch.Tensor:
    """Mean over batch, C, H, W of (model(x_t, sigma, text, mask) - (noise - x0))^2, in fp32.

    x0 (B, C, H, W) scaled latents; text (B, L, D) and mask (B, L) caption features; null_text (1, L, D).
    Random draws, in this order from `generator`: sigma (B,), noise like x0, caption dropout (B,).
    """
    B = x0.shape[0]
    x0 = x0.float()
    sigma = sample_sigmas(B, logit_mean, logit_std, flow_shift, generator, x0.device)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    text, _ = drop_captions(text, null_text, caption_dropout, generator)
    s = sigma.view(B, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise  # (B, C, H, W)
    v_pred = model(x_t, sigma, text, mask)
    return F.mse_loss(v_pred.float(), noise - x0)
