"""Sana's transformer layers as small modules over `sana.nn.functional`.

Shapes: B batch, N image tokens (H*W), L text tokens, C width, h heads, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sana.nn import functional as SF


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale (statistics in fp32)."""

    def __init__(self, dim: int, eps: float, init: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SF.rms_norm(x, self.weight, self.eps)


class MLPEmbedder(nn.Module):
    """Linear -> act -> Linear: timestep/guidance embedders (SiLU) and the caption projection (tanh GELU)."""

    def __init__(self, in_dim: int, dim: int, act: str):
        super().__init__()
        if act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {act!r}")
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = F.silu(x) if self.act == "silu" else SF.gelu_tanh(x)
        return self.fc2(x)


class LinearSelfAttention(nn.Module):
    """ReLU linear self-attention (Sana 'LiteLA'): fused qkv without bias, optional RMSNorm on q/k across heads."""

    def __init__(self, dim: int, head_dim: int, qk_norm: bool, eps: float = 1e-15):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not divisible by the linear-attention head width {head_dim}")
        self.heads, self.head_dim, self.eps = dim // head_dim, head_dim, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.k_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, perturb_from: int | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C). Rows from `perturb_from` on get identity attention (perturbed-attention
        guidance: proj(v), as diffusers' PAG processors), the others linear attention."""
        if perturb_from is not None:
            out = torch.cat([self._attend(x[:perturb_from]), self.proj(self._value(x[perturb_from:]))])
        else:
            out = self._attend(x)
        if out.dtype == torch.float16:  # the fp16-trained checkpoints rely on this clamp (diffusers #10336)
            out = out.clamp(-65504, 65504)
        return out

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, C) each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (B, N, self.heads, self.head_dim)
        q, k, v = F.relu(q).view(shape), F.relu(k).view(shape), v.reshape(shape)
        out = SF.relu_linear_attention(q, k, v, self.eps)  # (B, N, h, d) fp32
        return self.proj(out.reshape(B, N, C).to(x.dtype))

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv.weight[2 * x.shape[-1] :])


class CrossAttention(nn.Module):
    """Softmax cross-attention from image tokens to text tokens (SDPA), kv fused, optional q/k RMSNorm."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} cross-attention heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.k_norm = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text, (B, h, L, d) each: depend on the text only, so callers may reuse them."""
        B, L, C = y.shape
        k, v = self.kv(y).chunk(2, dim=-1)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return (k.reshape(B, L, self.heads, -1).transpose(1, 2), v.reshape(B, L, self.heads, -1).transpose(1, 2))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None):
        B, N, C = x.shape
        q = self.q(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.reshape(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias)  # bias (B, 1, 1, L)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MixFFN(nn.Module):
    """Mix-FFN (GLUMBConv): 1x1 expand + SiLU, depthwise 3x3, GLU (value * SiLU(gate)), 1x1 project without bias.

    The 1x1 convolutions run as Linear layers on tokens; the depthwise conv sees a channels-last view (no copy).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inverted = nn.Linear(dim, 2 * hidden)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = F.silu(self.inverted(x))  # (B, N, 2F)
        x = x.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, 2F, H, W), channels-last in memory
        x = self.depthwise(x).permute(0, 2, 3, 1).reshape(B, N, -1)  # (B, N, 2F)
        value, gate = x.chunk(2, dim=-1)
        return self.point(value * F.silu(gate))
