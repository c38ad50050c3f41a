"""DC-AE, the deep-compression autoencoder Sana uses as its VAE (arXiv 2410.10733), "sana" f32c32 variants.

    image (B, 3, H, W) in [-1, 1]  --encode-->  latent (B, c, H/f, W/f)  --decode-->  image (B, 3, H, W)

with f = 2^(S-1) for S stages (f = 32, c = 32 for dc-ae-f32c32-sana-1.0/1.1). Stage i runs at H/2^i with
width widths[i] and holds either ResBlocks (high resolution) or EfficientViT blocks (multi-scale ReLU linear
attention + GLU MBConv). Between stages: a stride-2 conv (encoder) or nearest x2 + conv (decoder), each plus a
parameter-free "residual autoencoding" shortcut (channel averaging of a space-to-channel reshape, or channel
duplication + channel-to-space). The latent is raw: the 0.41407 scaling factor is applied by the pipeline.

Native state-dict layout (this module's state_dict; `sana.weights.dcae` converts diffusers/original layouts):
    encoder.conv_in.{weight,bias}                 3x3 conv, in_channels -> widths[0]
    encoder.stages.{i}.blocks.{j}.<block>         stage i (resolution H/2^i), block j < encoder_depths[i]
    encoder.stages.{i}.down.conv.{weight,bias}    stride-2 3x3 conv widths[i] -> widths[i+1]  (i < S-1)
    encoder.conv_out.{weight,bias}                3x3 conv widths[-1] -> latent_channels
    decoder.conv_in.{weight,bias}                 3x3 conv latent_channels -> widths[-1]
    decoder.stages.{k}.up.conv.{weight,bias}      decoder stages are stored in EXECUTION order, k = S-1-i:
    decoder.stages.{k}.blocks.{j}.<block>         k = 0 is the deepest stage (no `up`), k = S-1 the finest
    decoder.norm_out.{weight,bias}                RMSNorm(widths[0]) -> ReLU -> conv_out
    decoder.conv_out.{weight,bias}                3x3 conv widths[0] -> in_channels
  <block> = ResBlock:          conv1.{weight,bias}  conv2.weight  norm.{weight,bias}
  <block> = EfficientViTBlock: attn.qkv.weight (3C, C, 1, 1): channels grouped per head as [q_h | k_h | v_h]
                               attn.multiscale.{s}.depthwise.weight (3C, 1, k, k)
                               attn.multiscale.{s}.pointwise.weight (3C, d, 1, 1)  (groups = 3 heads)
                               attn.proj.weight (C, nC) (Linear, n = 1 + number of scales)
                               attn.norm.{weight,bias}
                               mlp.conv_inverted.{weight (8C, C, 1, 1), bias}  mlp.conv_depth.{weight, bias}
                               mlp.conv_point.weight (C, 4C, 1, 1)  mlp.norm.{weight,bias}
Shapes: B batch, C channels, H W spatial, N = H*W tokens, h heads, d head width, n attention branches.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sana.errors import ConfigError
from sana.nn.functional import relu_linear_attention, rms_norm


class BlockType(enum.Enum):
    RES = "res"  # ResBlock: conv3x3 -> SiLU -> conv3x3 -> RMSNorm, residual
    VIT = "vit"  # EfficientViT block: LiteMLA (multi-scale linear attention) then GLUMBConv, both residual


_RES, _VIT = BlockType.RES, BlockType.VIT


@dataclass(frozen=True)
class DCAEConfig:
    """A DC-AE of the "sana" family: strided-conv down, interpolate+conv up, RMSNorm with bias, SiLU."""

    in_channels: int = 3
    latent_channels: int = 32
    widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_block_types: tuple[BlockType, ...] = (_RES, _RES, _RES, _VIT, _VIT, _VIT)
    decoder_block_types: tuple[BlockType, ...] = (_RES, _RES, _RES, _VIT, _VIT, _VIT)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    head_dim: int = 32  # d: attention heads per stage = widths[i] / head_dim
    scaling_factor: float = 0.41407  # diffusion latent = encode(x) * scaling_factor (applied by the pipeline)

    def __post_init__(self):
        S = len(self.widths)
        per_stage = {
            "encoder_depths": self.encoder_depths,
            "decoder_depths": self.decoder_depths,
            "encoder_block_types": self.encoder_block_types,
            "decoder_block_types": self.decoder_block_types,
            "encoder_qkv_multiscales": self.encoder_qkv_multiscales,
            "decoder_qkv_multiscales": self.decoder_qkv_multiscales,
        }
        _check(S >= 2, f"widths={self.widths} needs at least 2 stages")
        for name, value in per_stage.items():
            _check(len(value) == S, f"{name}={value} has {len(value)} entries, widths={self.widths} has {S}")
        _check(min(self.widths) > 0, f"widths={self.widths} must be positive")
        _check(
            self.in_channels > 0 and self.latent_channels > 0 and self.head_dim > 0,
            f"in_channels={self.in_channels}, latent_channels={self.latent_channels} and "
            f"head_dim={self.head_dim} must be positive",
        )
        _check(self.scaling_factor > 0, f"scaling_factor={self.scaling_factor} must be positive")
        for name in ("encoder_depths", "decoder_depths"):
            depths = getattr(self, name)
            _check(min(depths) >= 1, f"{name}={depths}: empty stages (the in/mix layout) are not supported")
        for i in range(S - 1):
            _check(
                4 * self.widths[i] % self.widths[i + 1] == 0,
                f"widths={self.widths}: 4 * {self.widths[i]} is not a multiple of {self.widths[i + 1]} "
                "(the averaging/duplicating shortcuts need whole channel groups)",
            )
        _check(
            self.widths[-1] % self.latent_channels == 0,
            f"widths[-1]={self.widths[-1]} is not a multiple of latent_channels={self.latent_channels}",
        )
        for side in ("encoder", "decoder"):
            types = getattr(self, f"{side}_block_types")
            scales = getattr(self, f"{side}_qkv_multiscales")
            _check(all(isinstance(t, BlockType) for t in types), f"{side}_block_types={types} must be BlockType")
            for i, (kind, ks) in enumerate(zip(types, scales, strict=True)):
                _check(all(k > 0 and k % 2 == 1 for k in ks), f"{side}_qkv_multiscales[{i}]={ks} must be odd")
                if kind is BlockType.RES:
                    _check(ks == (), f"{side}_qkv_multiscales[{i}]={ks} given for a ResBlock stage")
                else:
                    _check(
                        self.widths[i] % self.head_dim == 0,
                        f"widths[{i}]={self.widths[i]} is not divisible by head_dim={self.head_dim}",
                    )

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    @property
    def spatial_compression(self) -> int:
        """f: image side / latent side."""
        return 2 ** (self.num_stages - 1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_SANA_F32C32 = DCAEConfig()

DCAE_PRESETS: dict[str, DCAEConfig] = {
    "dc-ae-f32c32-sana-1.0": _SANA_F32C32,
    "dc-ae-f32c32-sana-1.1": _SANA_F32C32,  # same architecture and latent space, retrained decoder
}


# ----------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMSNorm with bias over the channel axis (efficientvit "trms2d"), statistics in fp32, eps 1e-5."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        # x: (B, C, H, W) with channel_dim=1, or (B, N, C) with channel_dim=-1; movedim is a view
        y = rms_norm(x.movedim(channel_dim, -1), self.weight, self.eps, self.bias)
        return y.movedim(-1, channel_dim)


class ResBlock(nn.Module):
    """x + RMSNorm(conv3x3_nobias(SiLU(conv3x3(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiscaleQKV(nn.Module):
    """Aggregates q, k, v over k x k pixels: depthwise conv, then a 1x1 conv within each d-channel group."""

    def __init__(self, channels: int, groups: int, kernel_size: int):
        super().__init__()
        self.depthwise = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:  # (B, 3C, H, W)
        return self.pointwise(self.depthwise(qkv))


def quadratic_relu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The N x N form of the ReLU linear attention (used for N <= d): same maths, (B, N, h, d) in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    scores = torch.einsum("bmhd,bnhd->bhmn", k, q)  # (B, h, N_keys, N_queries)
    scores = scores / (scores.sum(dim=2, keepdim=True) + eps)
    return torch.einsum("bhmn,bmhd->bnhd", scores, v)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (EfficientViT LiteMLA): the branch RMSNorm(proj(attn))."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], eps: float = 1e-15):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention width {channels} is not divisible by head_dim={head_dim}")
        self.head_dim, self.eps = head_dim, eps
        heads = channels // head_dim
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.multiscale = nn.ModuleList(MultiscaleQKV(3 * channels, 3 * heads, k) for k in scales)
        self.proj = nn.Linear((1 + len(scales)) * channels, channels, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        N, d = H * W, self.head_dim
        qkv = self.qkv(x)  # (B, 3C, H, W)
        if len(self.multiscale):
            qkv = torch.cat([qkv, *(ms(qkv) for ms in self.multiscale)], dim=1)  # (B, n 3C, H, W)
        # each head owns 3d consecutive channels [q | k | v]; the multi-scale branches add n-1 sets of heads
        q, k, v = qkv.reshape(B, -1, 3, d, N).permute(0, 4, 1, 2, 3).unbind(3)  # (B, N, n h, d) each
        q, k = F.relu(q), F.relu(k)
        if N > d:
            out = relu_linear_attention(q, k, v, self.eps, out_dtype=x.dtype)  # (B, N, n h, d), fp32 inside
        else:  # tiny inputs: the reference switches to the explicit N x N form at N <= d
            out = quadratic_relu_attention(q, k, v, self.eps)
        out = self.proj(out.to(x.dtype).flatten(2))  # (B, N, n C) -> (B, N, C)
        out = self.norm(out, channel_dim=-1)
        return out.transpose(1, 2).reshape(B, C, H, W)


class GLUMBConv(nn.Module):
    """GLU MBConv: 1x1 (C -> 8C), SiLU, depthwise 3x3, value * SiLU(gate), 1x1 (4C -> C), RMSNorm."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        value, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)  # (B, 4C, H, W) each
        return self.norm(self.conv_point(value * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x), then + GLUMBConv (context then local mixing, norms at the end of each branch)."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...]):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales)
        self.mlp = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = x + self.attn(x)
        return x + self.mlp(x)


def make_block(kind: BlockType, channels: int, head_dim: int, scales: tuple[int, ...]) -> nn.Module:
    if kind is BlockType.RES:
        return ResBlock(channels)
    if kind is BlockType.VIT:
        return EfficientViTBlock(channels, head_dim, scales)
    raise ValueError(f"unknown block type {kind!r}")


def average_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Mean over groups of consecutive channels: (B, G C', H, W) -> (B, C', H, W)."""
    return x.unflatten(1, (out_channels, -1)).mean(dim=2)


def duplicate_up(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Up 'duplicating' shortcut pixel_shuffle(repeat_interleave(x, R), 2) with R = 4 C'/C.

    (B, C, H, W) -> (B, C', 2H, 2W), built from an expanded view with one copy (for R | 4 or 4 | R).
    """
    B, C, H, W = x.shape
    repeats = 4 * out_channels // C
    y = x[:, :, None].expand(B, C, repeats, H, W).reshape(B, out_channels, 2, 2, H, W)  # repeat_interleave
    return y.permute(0, 1, 4, 2, 5, 3).reshape(B, out_channels, 2 * H, 2 * W)  # pixel_shuffle


class DownBlock(nn.Module):
    """Stride-2 3x3 conv + 'averaging' shortcut (channel-group mean of pixel_unshuffle(x, 2))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H/2, W/2)
        y = self.conv(x)
        return y.add_(average_channels(F.pixel_unshuffle(x, 2), self.conv.out_channels))


class UpBlock(nn.Module):
    """Nearest x2 then 3x3 conv + 'duplicating' shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', 2H, 2W)
        # the 4x-sized interpolated map dies as soon as the conv has read it; the shortcut is added in place
        y = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return y.add_(duplicate_up(x, self.conv.out_channels))


# ----------------------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder


class EncoderStage(nn.Module):
    def __init__(self, blocks: list[nn.Module], down: DownBlock | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.down is None else self.down(x)


class DecoderStage(nn.Module):
    def __init__(self, up: UpBlock | None, blocks: list[nn.Module]):
        super().__init__()
        self.up = up
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            x = self.up(x)
        for block in self.blocks:
            x = block(x)
        return x


class Encoder(nn.Module):
    """conv_in -> stages 0..S-1 (blocks, then stride-2 down) -> conv_out + channel-group mean shortcut."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        w, S = cfg.widths, cfg.num_stages
        self.latent_channels = cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)
        self.stages = nn.ModuleList(
            EncoderStage(
                [
                    make_block(cfg.encoder_block_types[i], w[i], cfg.head_dim, cfg.encoder_qkv_multiscales[i])
                    for _ in range(cfg.encoder_depths[i])
                ],
                DownBlock(w[i], w[i + 1]) if i < S - 1 else None,
            )
            for i in range(S)
        )
        self.conv_out = nn.Conv2d(w[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, c, H/f, W/f)
        x = self.conv_in(img)
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(x) + average_channels(x, self.latent_channels)


class Decoder(nn.Module):
    """stem (conv_in + channel duplication) -> `stages` in execution order (deepest first) -> head."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        w, S = cfg.widths, cfg.num_stages
        self.conv_in = nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1)
        self.stages = nn.ModuleList(
            DecoderStage(
                UpBlock(w[i + 1], w[i]) if i < S - 1 else None,
                [
                    make_block(cfg.decoder_block_types[i], w[i], cfg.head_dim, cfg.decoder_qkv_multiscales[i])
                    for _ in range(cfg.decoder_depths[i])
                ],
            )
            for i in reversed(range(S))
        )
        self.norm_out = RMSNorm(w[0])
        self.conv_out = nn.Conv2d(w[0], cfg.in_channels, 3, padding=1)

    def stem(self, z: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> (B, C_last, h, w)
        repeats = self.conv_in.out_channels // z.shape[1]
        return self.conv_in(z) + z.repeat_interleave(repeats, dim=1)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_0, H, W) -> (B, 3, H, W)
        return self.conv_out(F.relu(self.norm_out(x)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> (B, 3, f h, f w)
        x = self.stem(z)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


class DCAE(nn.Module):
    """The DC-AE autoencoder. `encode`/`decode` work on raw latents: the pipeline applies `scaling_factor`."""

    def __init__(self, config: DCAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H and W multiples of f -> raw latent (B, c, H/f, W/f)."""
        f, c = self.config.spatial_compression, self.config.in_channels
        if img.ndim != 4 or img.shape[1] != c:
            raise ValueError(f"encode expects images of shape (B, {c}, H, W), got {tuple(img.shape)}")
        if img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {img.shape[2]}x{img.shape[3]}")
        return self.encoder(img)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, c, h, w) -> image (B, 3, f h, f w), roughly in [-1, 1] (not clamped)."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"decode expects latents of shape (B, {c}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(encode(img))."""
        return self.decode(self.encode(img))
