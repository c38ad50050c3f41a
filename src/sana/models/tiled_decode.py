"""Exact low-memory DC-AE decode: the attention stages run whole, the local tail tile by tile with a halo.

The decoder's deep stages hold EfficientViT blocks whose linear attention is global (every output pixel depends on
the whole latent); the high-resolution stages after the last of them (UpBlocks, ResBlocks, the head RMSNorm -> ReLU
-> conv) are local: 3x3 convolutions plus per-pixel ops. So

    z (B, c, h, w) --stem + global stages--> x (B, C, h', w')  (whole, "low-res")
    x --local tail, per tile--> image (B, 3, F h', F w'),  F = product of the tail's upsampling factors

where each output tile [a, b) (a multiple of F) is computed from the crop x[a/F - halo : b/F + halo], clipped at
the image border so that borders see the same zero padding as the untiled run. The halo is the tail's receptive
field, derived from its modules: going backwards from the output, each conv adds dilation (k-1)/2 pixels at its own
resolution and a nearest x2 upsampling halves what is needed (rounded up). The result equals the untiled decode:
the same modules compute every kept pixel from the same inputs (only the zero-padded inner crop borders differ, and
the pixels they reach are cut away), up to the rounding of the kernels a backend picks for each shape (fp32: 5e-7
of max|image| on an H200, bitwise when one tile covers the image). After each module the tile is trimmed to the
halo still needed downstream, so no pixel is computed more often than the halo requires.

Memory: only the low-res features x and the output image are whole; the tail's wide full-resolution maps (128 x
4096^2 at 4K, plus the 4x-sized interpolated map and fp32 RMSNorm temporaries) exist one tile at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sana.models.dcae import DCAE, Decoder, LiteMLA, ResBlock, UpBlock

_UP_SCALE = 2  # UpBlock: nearest x2, then its conv
_MEMORY_FRACTION = 0.8  # of the free memory that a decode may plan to use (allocator slack, cuDNN workspaces)
_CPU_FALLBACK_FREE_BYTES = 4 << 30  # when the free RAM cannot be read
_MIN_AUTO_TILE = 256  # output pixels: below this the halos cost more than the tile (and tiles are too many)


@dataclass(frozen=True)
class LocalUnit:
    """One module of the local tail: nearest x`scale` (1: none), convs reading `halo` pixels beyond each side of
    their output (at the output resolution), per-pixel ops otherwise. Peak live memory per output pixel (an
    estimate) is `act` elements in the model dtype plus `fp32` float32 temporaries (RMSNorm statistics)."""

    run: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    scale: int
    halo: int
    act: float
    fp32: float

    def bytes_per_pixel(self, itemsize: int) -> float:
        return self.act * itemsize + self.fp32 * 4


@dataclass(frozen=True)
class LocalPlan:
    """How a decoder splits: `decoder.stages[:start]` run whole, then `units` run per tile.

    needed[k]: halo (pixels, each side) that unit k's output must keep for the units after it (needed[-1] = 0).
    halo: halo at the tail's input (low-res pixels) for tiles aligned to the low-res grid; `scale` = F.
    """

    start: int
    units: tuple[LocalUnit, ...]
    needed: tuple[int, ...]
    halo: int
    scale: int


def conv_halo(conv: nn.Conv2d) -> int:
    """Pixels a 'same' stride-1 conv reads beyond each side of its output: dilation * (k - 1) / 2."""
    k, d = conv.kernel_size[0], conv.dilation[0]
    same = d * (k - 1) // 2
    square = conv.kernel_size == (k, k) and conv.dilation == (d, d) and k % 2 == 1
    if not square or conv.stride != (1, 1) or conv.padding != (same, same) or conv.padding_mode != "zeros":
        raise ValueError(f"tiled decode needs square odd stride-1 'same' zero-padded convs, got {conv}")
    return same


def _units(decoder: Decoder, start: int) -> list[LocalUnit]:
    units = []
    for stage in decoder.stages[start:]:
        if stage.up is not None:
            if not isinstance(stage.up, UpBlock):
                raise TypeError(f"the local tail can only upsample with UpBlock, got {type(stage.up).__name__}")
            c_in, c_out = stage.up.conv.in_channels, stage.up.conv.out_channels
            # input, its interpolation, the conv output and the duplicating shortcut
            units.append(LocalUnit(stage.up, _UP_SCALE, conv_halo(stage.up.conv), c_in / 4 + c_in + 2 * c_out, 0))
        for block in stage.blocks:
            if not isinstance(block, ResBlock):
                raise TypeError(f"the local tail can only hold ResBlocks, got {type(block).__name__}")
            c = block.conv1.out_channels
            # input + conv output, and the fp32 temporaries of RMSNorm (measured on an H200: 13.3 C bytes per
            # pixel in bf16, 14 C in fp32)
            units.append(LocalUnit(block, 1, conv_halo(block.conv1) + conv_halo(block.conv2), 2 * c, 2.5 * c))
    c = decoder.conv_out.in_channels
    units.append(LocalUnit(decoder.head, 1, conv_halo(decoder.conv_out), 2 * c, 2.5 * c))  # as a ResBlock
    return units


def local_plan(decoder: Decoder, _halo_shrink: int = 0) -> LocalPlan:
    """Split after the last stage holding attention; derive the tail's halo from its modules (see module doc).

    _halo_shrink (tests only) makes the input halo that many pixels too small, to show seams appear.
    """
    start = max(
        (k + 1 for k, stage in enumerate(decoder.stages) if any(isinstance(m, LiteMLA) for m in stage.modules())),
        default=0,
    )
    units = _units(decoder, start)
    needed, h = [], 0
    for unit in reversed(units):
        needed.append(h)
        h = -(-(h + unit.halo) // unit.scale)  # ceil: pixels needed at the unit's input for an aligned tile
    return LocalPlan(start, tuple(units), tuple(reversed(needed)), h - _halo_shrink, math.prod(u.scale for u in units))


def receptive_halo(decoder: Decoder) -> int:
    """Minimal halo (low-res pixels, each side) that makes a tile of the local tail exact."""
    return local_plan(decoder).halo


def _decoder(decoder_or_ae: Decoder | DCAE, z: torch.Tensor) -> Decoder:
    decoder = decoder_or_ae.decoder if isinstance(decoder_or_ae, DCAE) else decoder_or_ae
    if not isinstance(decoder, Decoder):
        raise TypeError(f"expected a DCAE or its Decoder, got {type(decoder_or_ae).__name__}")
    c = decoder.conv_in.in_channels
    if z.ndim != 4 or z.shape[1] != c:
        raise ValueError(f"decode expects latents of shape (B, {c}, h, w), got {tuple(z.shape)}")
    return decoder


def _decode_tile(plan: LocalPlan, x: torch.Tensor, span: list[tuple[int, int]]) -> torch.Tensor:
    """The local tail on one tile. span: the tile's [start, end) in low-res pixels per axis (rows, cols) of x.

    ext tracks the [start, end) that the current tensor covers per axis, in its own resolution's pixels.
    """
    size = x.shape[2:]
    ext = [(max(a - plan.halo, 0), min(b + plan.halo, n)) for (a, b), n in zip(span, size, strict=True)]
    y = x[:, :, ext[0][0] : ext[0][1], ext[1][0] : ext[1][1]]  # (B, C, h_crop, w_crop)
    scale = 1
    for unit, needed in zip(plan.units, plan.needed, strict=True):
        y = unit.run(y)
        scale *= unit.scale
        ext = [(lo * unit.scale, hi * unit.scale) for lo, hi in ext]
        # keep what the units after this one read; the pixels cut off (next to an inner crop edge) saw zeros
        keep = [
            (max(a * scale - needed, lo), min(b * scale + needed, n * scale, hi))
            for (a, b), n, (lo, hi) in zip(span, size, ext, strict=True)
        ]
        if keep != ext:
            (r0, r1), (c0, c1) = ((k0 - e0, k1 - e0) for (k0, k1), (e0, _) in zip(keep, ext, strict=True))
            y, ext = y[:, :, r0:r1, c0:c1].contiguous(), keep  # the copy frees the untrimmed map
    if ext != [(a * scale, b * scale) for a, b in span]:
        raise AssertionError(f"tile {span} decoded to {ext} (halo too small)")
    return y


@torch.no_grad()
def tiled_decode(decoder_or_ae: Decoder | DCAE, z: torch.Tensor, tile: int | None = None, *, _halo_shrink: int = 0):
    """Raw latent (B, c, h, w) -> image (B, 3, f h, f w), equal to the untiled decode, in square output tiles.

    tile: output tile side in pixels, rounded down to a multiple of the tail's upsampling factor F (at least F);
    None: the largest that fits the free memory of z's device (`choose_tile`), or the whole image.
    """
    decoder = _decoder(decoder_or_ae, z)
    plan = local_plan(decoder, _halo_shrink)
    if tile is None:
        tile = choose_tile(decoder, z) or max(z.shape[2:]) * _output_scale(decoder)
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    x = decoder.stem(z)
    for stage in decoder.stages[: plan.start]:
        x = stage(x)  # (B, C, h', w'): the global stages, whole
    return decode_tail(plan, x, max(tile // plan.scale, 1), decoder.conv_out.out_channels)


@torch.no_grad()
def decode_tail(plan: LocalPlan, x: torch.Tensor, t: int, channels: int) -> torch.Tensor:
    """The local tail over x (B, C, h', w') in t x t low-res tiles -> (B, channels, F h', F w')."""
    B, _, h, w = x.shape
    F = plan.scale
    out = x.new_empty(B, channels, F * h, F * w)
    for r in range(0, h, t):
        for c in range(0, w, t):
            span = [(r, min(r + t, h)), (c, min(c + t, w))]
            out[:, :, F * r : F * span[0][1], F * c : F * span[1][1]] = _decode_tile(plan, x, span)
    return out


# ----------------------------------------------------------------------------------------------------------
# Choosing the tile from the free memory


def _output_scale(decoder: Decoder) -> int:
    """f: output pixels per latent pixel."""
    return _UP_SCALE ** sum(stage.up is not None for stage in decoder.stages)


def _free_bytes(device: torch.device) -> int:
    """Memory a decode can use on device: CUDA free + reusable cached blocks; CPU available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return _CPU_FALLBACK_FREE_BYTES


def tile_bytes(plan: LocalPlan, rows: int, cols: int, size: tuple[int, int], itemsize: int, halo: bool = True):
    """Estimated peak bytes per batch item of the local tail on a rows x cols tile (low-res pixels) of a low-res
    map of `size`, with the halos (or without: the untiled tail when the tile is the whole map)."""
    peak, need = 0.0, plan.halo if halo else 0
    sides, full = [rows, cols], list(size)
    for unit, needed in zip(plan.units, plan.needed, strict=True):
        full = [n * unit.scale for n in full]
        ext = [min((s + 2 * need) * unit.scale, n) for s, n in zip(sides, full, strict=True)]  # untrimmed output
        sides = [s * unit.scale for s in sides]
        peak = max(peak, unit.bytes_per_pixel(itemsize) * ext[0] * ext[1])
        need = needed if halo else 0
    return peak


def choose_tile(decoder_or_ae: Decoder | DCAE, z: torch.Tensor) -> int | None:
    """Output tile side (pixels) for decoding z within the free memory of z's device; None if untiled fits.

    The estimate covers the local tail only (the global stages run whole either way); the tile never goes below
    256 pixels, however little memory is free."""
    decoder = _decoder(decoder_or_ae, z)
    plan = local_plan(decoder)
    itemsize = decoder.conv_out.weight.element_size()
    budget = _MEMORY_FRACTION * _free_bytes(z.device)
    B, F = z.shape[0], plan.scale
    size = tuple(n * _output_scale(decoder) // F for n in z.shape[2:])  # the tail's input, low-res pixels
    out_bytes = B * decoder.conv_out.out_channels * F * F * size[0] * size[1] * itemsize
    if B * tile_bytes(plan, *size, size, itemsize, halo=False) + out_bytes <= budget:
        return None
    t, t_min = max(size), max(_MIN_AUTO_TILE // F, 1)
    while t > t_min and B * tile_bytes(plan, min(t, size[0]), min(t, size[1]), size, itemsize) + out_bytes > budget:
        t -= 1
    return t * F


def decode_auto(ae: DCAE, z: torch.Tensor) -> torch.Tensor:
    """ae.decode(z) when it fits the free memory, else the exact tiled decode with the largest tile that fits."""
    tile = choose_tile(ae, z)
    if tile is None:
        with torch.no_grad():
            return ae.decode(z)
    return tiled_decode(ae, z, tile)
