"""The maths of Sana's layers as plain functions (reference versions of every fused kernel)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, bias: torch.Tensor | None = None):
    """RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * w (+ b), statistics in fp32."""
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # (..., 1): no fp32 copy of x kept alive
    y = (x * rstd).to(x.dtype)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift and scale are (B, C), x is (B, N, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def relu_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-15,
    out_dtype: torch.dtype = torch.float32,
    chunk: int = 16384,
) -> torch.Tensor:
    """Sana's ReLU linear attention (paper Eq. 1), per head, accumulated in fp32.

    q, k, v: (B, N, h, d) in any dtype (q and k already ReLU'd by the caller). Returns (B, N, h, d) in out_dtype:
        O_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + eps).
    Equal to the reference's pad-V-with-a-row-of-ones formulation: the extra row is sum_j k_j. Sequences longer
    than `chunk` tokens are processed in chunks (sums accumulated in fp32), so no fp32 copy of q, k, v or the
    output is ever whole: the DC-AE's 512^2-token attention at 4096px needs it.
    """
    B, N, h, d = q.shape
    if N <= chunk:
        q, k, v = q.float(), k.float(), v.float()
        kv = torch.einsum("bnhd,bnhe->bhde", k, v)  # (B, h, d, d)
        k_sum = k.sum(dim=1)  # (B, h, d)
        num = torch.einsum("bnhd,bhde->bnhe", q, kv)  # (B, N, h, d)
        den = torch.einsum("bnhd,bhd->bnh", q, k_sum)  # (B, N, h)
        return (num / (den[..., None] + eps)).to(out_dtype)
    kv = torch.zeros(B, h, d, v.shape[-1], dtype=torch.float32, device=q.device)
    k_sum = torch.zeros(B, h, d, dtype=torch.float32, device=q.device)
    for s in range(0, N, chunk):
        kc, vc = k[:, s : s + chunk].float(), v[:, s : s + chunk].float()
        kv += torch.einsum("bnhd,bnhe->bhde", kc, vc)
        k_sum += kc.sum(dim=1)
    out = torch.empty(B, N, h, v.shape[-1], dtype=out_dtype, device=q.device)
    for s in range(0, N, chunk):
        qc = q[:, s : s + chunk].float()
        num = torch.einsum("bnhd,bhde->bnhe", qc, kv)
        den = torch.einsum("bnhd,bhd->bnh", qc, k_sum)
        out[:, s : s + chunk] = (num / (den[..., None] + eps)).to(out_dtype)
    return out


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos(t f), sin(t f)] with f_i = exp(-ln(max_period) i / (dim/2)); (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@functools.lru_cache(maxsize=32)
def _sincos_2d_cpu(dim: int, h: int, w: int, base_size: int, interpolation: float) -> torch.Tensor:
    # float64 as the reference (numpy) computes it; [emb(w-coordinate), emb(h-coordinate)], row-major tokens.
    pos_h = torch.arange(h, dtype=torch.float64) / (h / base_size) / interpolation
    pos_w = torch.arange(w, dtype=torch.float64) / (w / base_size) / interpolation
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos):  # (P,) -> (P, dim/2): [sin, cos]
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    grid_h = pos_h[:, None].expand(h, w).reshape(-1)
    grid_w = pos_w[None, :].expand(h, w).reshape(-1)
    return torch.cat([emb(grid_w), emb(grid_h)], dim=1).float()


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, interpolation: float, device=None):
    """2-D sin-cos position embedding for an h x w token grid, (h*w, dim) fp32 (reference section 1.8)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    return _sincos_2d_on(dim, h, w, base_size, float(interpolation), str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=32)
def _sincos_2d_on(dim: int, h: int, w: int, base_size: int, interpolation: float, device: str) -> torch.Tensor:
    # Cached per device: no host-to-device copy at each call (and none inside a captured CUDA graph).
    return _sincos_2d_cpu(dim, h, w, base_size, interpolation).to(device)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
