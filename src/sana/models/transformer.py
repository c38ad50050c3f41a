"""The Sana linear diffusion transformer: one model for every released variant.

Sana 1.0 (600M/1600M, NoPE at 512/1024, sin-cos PE at 2K/4K), Sana-1.5 (RMSNorm on q/k across heads in both
attentions) and Sana-Sprint (flow time in [0, 1] fed directly, guidance embedding) differ only by config.

Native state-dict layout (this module's own names):
    patch_embed.{weight,bias}           Conv2d(in, C, p, p)
    time_embed.fc{1,2}.*                sinusoid(256) -> C -> C         guidance_embed.fc{1,2}.* (Sprint)
    t_block.{weight,bias}               Linear(C, 6C): adaLN-single, shared by all blocks
    caption_proj.fc{1,2}.*, caption_norm.weight
    blocks.{i}.scale_shift_table        (6, C)
    blocks.{i}.attn.qkv.weight          (3C, C) rows [q; k; v]          attn.{q,k}_norm.weight (1.5/Sprint)
    blocks.{i}.attn.proj.*
    blocks.{i}.cross_attn.q.*, .kv.*    kv rows [k; v]                   cross_attn.{q,k}_norm.weight
    blocks.{i}.cross_attn.proj.*
    blocks.{i}.ffn.inverted.*           Linear(C, 2F)   ffn.depthwise.* Conv2d(2F, 2F, 3, groups=2F)
    blocks.{i}.ffn.point.weight         Linear(F, C), no bias
    final.scale_shift_table (2, C), final.linear.*
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sana.nn import functional as SF
from sana.nn.layers import CrossAttention, LinearSelfAttention, MixFFN, MLPEmbedder, RMSNorm


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a Sana transformer. Field names follow the paper; defaults are Sana 1.0 600M at 1024px."""

    hidden_size: int = 1152  # C
    depth: int = 28
    linear_head_dim: int = 32  # self-attention heads = C / 32
    cross_heads: int = 16  # cross-attention heads (head width C / cross_heads)
    in_channels: int = 32
    out_channels: int = 32
    caption_channels: int = 2304  # Gemma-2-2B width
    mlp_ratio: float = 2.5  # Mix-FFN hidden = int(C * mlp_ratio)
    patch_size: int = 1
    sample_size: int = 32  # latent side of the training resolution (image px / 32): PE base and resolution bins
    pe_interpolation: float | None = None  # None: no positional embedding (NoPE); 1.0 for 2K, 2.0 for 4K
    qk_norm: bool = False  # Sana-1.5 / Sprint
    guidance_embeds: bool = False  # Sana-Sprint: embedded guidance scale
    guidance_embeds_scale: float = 0.1  # guidance enters the embedder as scale * this
    time_scale: float = 1000.0  # the sinusoid sees t * time_scale: 1000 for Sana, 1 for Sprint

    def __post_init__(self):
        C = self.hidden_size
        checks = [
            (C > 0 and self.depth > 0, f"hidden_size={C} and depth={self.depth} must be positive"),
            (C % self.linear_head_dim == 0, f"hidden_size={C} not divisible by linear_head_dim={self.linear_head_dim}"),
            (C % self.cross_heads == 0, f"hidden_size={C} not divisible by cross_heads={self.cross_heads}"),
            (self.patch_size >= 1, f"patch_size={self.patch_size} must be >= 1"),
            (self.pe_interpolation is None or C % 4 == 0, f"sin-cos PE needs hidden_size % 4 == 0, got {C}"),
            (
                self.pe_interpolation is None or self.pe_interpolation > 0,
                f"pe_interpolation={self.pe_interpolation} must be positive",
            ),
            (self.time_scale > 0, f"time_scale={self.time_scale} must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def ffn_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


_600M = TransformerConfig()
_1600M = dataclasses.replace(_600M, hidden_size=2240, depth=20, cross_heads=20)

TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "sana-600m-512": dataclasses.replace(_600M, sample_size=16),
    "sana-600m-1024": _600M,
    "sana-1600m-512": dataclasses.replace(_1600M, sample_size=16),
    "sana-1600m-1024": _1600M,
    "sana-1600m-2k": dataclasses.replace(_1600M, sample_size=64, pe_interpolation=1.0),
    "sana-1600m-4k": dataclasses.replace(_1600M, sample_size=128, pe_interpolation=2.0),
    "sana1.5-1.6b": dataclasses.replace(_1600M, qk_norm=True),
    "sana1.5-4.8b": dataclasses.replace(_1600M, depth=60, qk_norm=True),
    "sana-sprint-0.6b": dataclasses.replace(_600M, qk_norm=True, guidance_embeds=True, time_scale=1.0),
    "sana-sprint-1.6b": dataclasses.replace(_1600M, qk_norm=True, guidance_embeds=True, time_scale=1.0),
}


@dataclass(frozen=True)
class TextContext:
    """Per-block text keys/values (B, heads, L, d) and the additive mask bias (B, 1, 1, L) or None."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    bias: torch.Tensor | None


class SanaBlock(nn.Module):
    """x += gate * LinearAttn(mod(LN(x))); x += CrossAttn(x, text); x += gate * MixFFN(mod(LN(x)))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)
        self.attn = LinearSelfAttention(C, cfg.linear_head_dim, cfg.qk_norm)
        self.cross_attn = CrossAttention(C, cfg.cross_heads, cfg.qk_norm)
        self.ffn = MixFFN(C, cfg.ffn_hidden)

    def forward(self, x, t6, text_kv, bias, H: int, W: int, perturb_from: int | None = None):
        # x (B, N, C); t6 (B, 6C); text_kv: keys/values (B, h, L, d); bias (B, 1, 1, L) additive mask
        B, N, C = x.shape
        mod = self.scale_shift_table[None] + t6.view(B, 6, C)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # (B, C) each
        h = SF.modulate(F.layer_norm(x, (C,), eps=1e-6), shift_msa, scale_msa).to(x.dtype)
        x = x + gate_msa[:, None] * self.attn(h, perturb_from)
        x = x + self.cross_attn(x, text_kv, bias)
        h = SF.modulate(F.layer_norm(x, (C,), eps=1e-6), shift_mlp, scale_mlp)
        return x + gate_mlp[:, None] * self.ffn(h, H, W)


class FinalLayer(nn.Module):
    """LN(x) * (1 + scale) + shift with (shift, scale) = table + t_emb (un-projected), then Linear to patches."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.hidden_size
        self.scale_shift_table = nn.Parameter(torch.randn(2, C) / C**0.5)
        self.linear = nn.Linear(C, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)  # (B, C) each
        return self.linear(SF.modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale))


class SanaTransformer(nn.Module):
    """v = model(x, t, text, text_mask[, guidance]): the flow velocity of latent x at flow time t in [0, 1]."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        cfg = self.config = config
        C, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, C, kernel_size=p, stride=p)
        self.time_embed = MLPEmbedder(256, C, "silu")
        self.guidance_embed = MLPEmbedder(256, C, "silu") if cfg.guidance_embeds else None
        self.t_block = nn.Linear(C, 6 * C)
        self.caption_proj = MLPEmbedder(cfg.caption_channels, C, "gelu_tanh")
        self.caption_norm = RMSNorm(C, eps=1e-5, init=0.01)
        self.blocks = nn.ModuleList(SanaBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (training memory for compute)."""
        self.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def embed_time(self, t: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype):
        """(t6 (B, 6C) for the blocks, t_emb (B, C) for the final layer) from flow time t (B,) in [0, 1]."""
        # float64 product so that t = k/1000 gives exactly the integer timestep k the reference feeds.
        model_t = (t.double() * self.config.time_scale).float()
        t_emb = self.time_embed(SF.timestep_sinusoid(model_t).to(dtype))
        if self.guidance_embed is not None:
            if guidance is None:
                raise ValueError("this model embeds the guidance scale (Sana-Sprint): pass guidance=")
            g = guidance.double() * self.config.guidance_embeds_scale
            t_emb = t_emb + self.guidance_embed(SF.timestep_sinusoid(g.float()).to(dtype))
        return self.t_block(F.silu(t_emb)), t_emb

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Caption MLP + RMSNorm: (B, L, 2304) -> (B, L, C)."""
        return self.caption_norm(self.caption_proj(text))

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextContext:
        """Everything the blocks need from the text, computed once: it does not change across sampling steps."""
        y = self.embed_text(text.to(self.dtype))  # (B, L, C)
        bias = None
        if text_mask is not None:  # additive bias as the reference: (1 - m) * -10000 in the model dtype
            bias = ((1 - text_mask.to(self.dtype)) * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
        return TextContext(tuple(block.cross_attn.text_kv(y) for block in self.blocks), bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor | TextContext,
        text_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        pag_blocks: Sequence[int] = (),
        pag_from: int | None = None,
    ) -> torch.Tensor:
        """x (B, Cin, H, W) latent; t (B,) or scalar flow time; text (B, L, 2304); text_mask (B, L), 1 = real token.

        `text` may instead be a TextContext from `encode_text` (then text_mask is not used): samplers call the
        model many times with the same text.
        Returns the velocity (B, Cout, H, W) in x's layout. H and W must be multiples of the patch size.
        Perturbed-attention guidance: in blocks `pag_blocks`, batch rows `pag_from:` get identity attention.
        """
        cfg, p = self.config, self.config.patch_size
        B, _, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        ctx = text if isinstance(text, TextContext) else None
        if ctx is None and text.shape[0] != B:
            raise ValueError(f"text batch {text.shape[0]} does not match latent batch {B}")
        h, w = H // p, W // p
        dtype = self.dtype
        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        if cfg.pe_interpolation is not None:
            pe = SF.sincos_pos_embed_2d(cfg.hidden_size, h, w, cfg.sample_size // p, cfg.pe_interpolation, x.device)
            tokens = (tokens.float() + pe).to(dtype)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(B)
        t6, t_emb = self.embed_time(t, guidance, dtype)
        if ctx is None:  # computed here inside autograd when training
            ctx = self.encode_text(text, text_mask)
        if pag_blocks and pag_from is None:
            raise ValueError("pag_blocks needs pag_from, the first batch row with perturbed attention")
        bias = ctx.bias
        for i, block in enumerate(self.blocks):
            text_kv = ctx.kv[i]
            perturb = pag_from if i in pag_blocks else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, t6, text_kv, bias, h, w, perturb, use_reentrant=False)
            else:
                tokens = block(tokens, t6, text_kv, bias, h, w, perturb)
        out = self.final(tokens, t_emb)  # (B, N, p*p*Cout)
        out = out.view(B, h, w, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, Cout, h, p, w, p)
        return out.reshape(B, cfg.out_channels, H, W)
