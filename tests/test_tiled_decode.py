"""Exact tiled DC-AE decode: equal to the untiled decode, minimal halo, memory bounded by the tile, auto choice."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn

import sana.models.tiled_decode as td
from sana.models.dcae import DCAE, BlockType, DCAEConfig, Decoder
from sana.models.tiled_decode import (
    choose_tile,
    conv_halo,
    decode_auto,
    local_plan,
    receptive_halo,
    tile_bytes,
    tiled_decode,
)

RES, VIT = BlockType.RES, BlockType.VIT


def _config(widths, depths, types, latent=4) -> DCAEConfig:
    scales = tuple((5,) if t is VIT else () for t in types)
    return DCAEConfig(
        latent_channels=latent,
        widths=widths,
        encoder_depths=(1,) * len(widths),
        decoder_depths=depths,
        encoder_block_types=types,
        decoder_block_types=types,
        encoder_qkv_multiscales=scales,
        decoder_qkv_multiscales=scales,
        head_dim=8,
    )


# Sana's structure shrunk: ResBlock stages then EfficientViT stages (f = 8, tail F = 4; widths give both the
# R = 4 and R = 2 duplicating shortcuts).
TINY = _config((8, 16, 16, 32), (2, 1, 1, 1), (RES, RES, VIT, VIT))
# Three ResBlock stages like sana (f = 16, tail F = 8).
TINY3 = _config((8, 8, 16, 16, 16), (1, 1, 1, 1, 1), (RES, RES, RES, VIT, VIT))
# Edge cases: no attention (the whole decoder after the stem is the tail) and attention everywhere (no tail but
# the head, F = 1).
ALL_RES = _config((8, 16, 16), (1, 2, 1), (RES, RES, RES))
ALL_VIT = _config((8, 16, 16), (1, 1, 1), (VIT, VIT, VIT))


def _random_ae(cfg: DCAEConfig, seed: int = 0) -> DCAE:
    """Default init, with norm weights and biases perturbed so that every term matters."""
    torch.manual_seed(seed)
    ae = DCAE(cfg).eval()
    with torch.no_grad():
        for p in ae.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ae


@pytest.fixture(scope="module")
def tiny():
    return _random_ae(TINY)


@pytest.fixture(scope="module")
def tiny3():
    return _random_ae(TINY3)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ref.shape, ours.dtype, ref.dtype)
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _untiled(ae: DCAE, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ae.decode(z)


# ---------------------------------------------------------------------------------------------------------
# The halo


def test_receptive_halo_by_hand():
    # Backwards from the output: each 3x3 conv +1 at its resolution, nearest x2 halves (rounded up).
    # sana: head 1; stage 0: 3 ResBlocks +6 = 7, up conv +1 = 8 -> 4 at H/2; stage 1: +6 +1 = 11 -> 6 at H/4;
    # stage 2: +6 +1 = 13 -> 7 at H/8 (the input of the tail, after the last attention stage).
    with torch.device("meta"):
        sana = Decoder(DCAEConfig())
    plan = local_plan(sana)
    assert (plan.start, plan.scale, plan.halo) == (3, 8, 7)
    assert plan.needed == (12, 10, 8, 6, 10, 8, 6, 4, 7, 5, 3, 1, 0)  # after each up, ResBlock, ..., head
    assert receptive_halo(sana) == 7
    # TINY: head 1; stage 0: 2 ResBlocks -> 5, up -> 6 -> 3; stage 1: 1 ResBlock -> 5, up -> 6 -> 3.
    assert receptive_halo(_random_ae(TINY).decoder) == 3
    # TINY3: head 1; +2 +1 = 4 -> 2; +2 +1 = 5 -> 3; +2 +1 = 6 -> 3.
    assert receptive_halo(_random_ae(TINY3).decoder) == 3
    assert local_plan(_random_ae(ALL_RES).decoder).start == 0
    assert (local_plan(_random_ae(ALL_VIT).decoder).start, local_plan(_random_ae(ALL_VIT).decoder).scale) == (3, 1)


def test_conv_halo():
    assert conv_halo(nn.Conv2d(2, 2, 3, padding=1)) == 1
    assert conv_halo(nn.Conv2d(2, 2, 5, padding=2)) == 2
    assert conv_halo(nn.Conv2d(2, 2, 3, padding=2, dilation=2)) == 2
    for bad in (
        nn.Conv2d(2, 2, 3, padding=1, stride=2),
        nn.Conv2d(2, 2, 3, padding=0),
        nn.Conv2d(2, 2, (3, 5), padding=(1, 2)),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    ):
        with pytest.raises(ValueError, match="tiled decode needs"):
            conv_halo(bad)


@pytest.mark.parametrize("cfg", [TINY, TINY3], ids=["tiny", "tiny3"])
def test_halo_is_the_exact_dependency_cone(cfg):
    """Independently of the tiling code: changing low-res column q of the tail's input (the decoder's own modules,
    untiled) changes output pixels in the F-wide blocks q - halo ... q + halo, both end blocks included."""
    decoder = _random_ae(cfg).decoder.double()
    plan = local_plan(decoder)
    H, F = plan.halo, plan.scale

    def tail(x):
        for stage in decoder.stages[plan.start :]:
            x = stage(x)
        return decoder.head(x)

    torch.manual_seed(1)
    x = torch.randn(1, decoder.stages[plan.start].up.conv.in_channels, 5, 24, dtype=torch.float64)
    q = 11
    x2 = x.clone()
    x2[..., q] += torch.randn_like(x2[..., q])
    with torch.no_grad():
        changed = (tail(x) != tail(x2)).flatten(0, 2).any(0).nonzero().flatten()  # output columns
    assert changed.min().item() // F == q - H  # needs halo on the right of a tile
    assert changed.max().item() // F == q + H  # ... and on the left


# ---------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize(
    "cfg, latent, tiles",
    [
        (TINY, (2, 6, 10), [1, 4, 12, 20, 28, 1000]),  # minimum (1 -> F = 4), non-dividing, larger than image
        (TINY, (1, 5, 3), [8, 16]),  # odd non-square
        (TINY3, (1, 4, 6), [8, 24, 40]),
        (ALL_RES, (1, 6, 4), [4, 12]),
        (ALL_VIT, (1, 3, 5), [1, 7]),
    ],
    ids=["tiny-batch2", "tiny-odd", "tiny3", "all-res", "all-vit"],
)
def test_tiled_equals_untiled(cfg, latent, tiles):
    ae = _random_ae(cfg)
    B, h, w = latent
    z = torch.randn(B, cfg.latent_channels, h, w)
    ref = _untiled(ae, z)
    for tile in tiles:
        assert _rel_err(tiled_decode(ae, z, tile), ref) <= 1e-5, tile
    assert _rel_err(tiled_decode(ae.decoder, z, tiles[0]), ref) <= 1e-5  # the decoder alone works too


def test_shrunken_halo_shows_seams(tiny):
    z = torch.randn(1, 4, 6, 10)
    ref = _untiled(tiny, z)
    assert _rel_err(tiled_decode(tiny, z, 8), ref) <= 1e-5
    assert _rel_err(tiled_decode(tiny, z, 8, _halo_shrink=1), ref) > 1e-3  # the seams are visible to the test


def test_bf16_close_to_fp32(tiny):
    z = torch.randn(2, 4, 6, 10)
    ref = _untiled(tiny, z)
    bf16 = _random_ae(TINY).to(torch.bfloat16)
    untiled = _untiled(bf16, z.bfloat16())
    tiled = tiled_decode(bf16, z.bfloat16(), 12)
    assert tiled.dtype == torch.bfloat16
    err_untiled = _rel_err(untiled.float(), ref)
    err_tiled = _rel_err(tiled.float(), ref)
    assert err_tiled <= 5e-2
    assert err_tiled <= 1.5 * err_untiled + 1e-3, (err_tiled, err_untiled)  # tiling adds no error of its own


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="positive"):
        tiled_decode(tiny, torch.randn(1, 4, 2, 2), 0)
    with pytest.raises(ValueError, match="latents of shape"):
        tiled_decode(tiny, torch.randn(1, 3, 2, 2), 8)


# ---------------------------------------------------------------------------------------------------------
# Memory


def _largest_tail_tensor(ae: DCAE, decode) -> int:
    """Largest numel among the inputs and outputs of every decoder module (a conv's input in an UpBlock is the
    interpolated map) from the first module of the local tail on; the global stages are not counted."""
    plan = local_plan(ae.decoder)
    state = {"active": False, "max": 0}

    def record(module, args, output):
        if state["active"]:
            for t in (*args, output):
                if isinstance(t, torch.Tensor):
                    state["max"] = max(state["max"], t.numel())

    def activate(module, args):
        state["active"] = True

    handles = [m.register_forward_hook(record) for m in ae.decoder.modules()]
    handles.append(ae.decoder.stages[plan.start].up.register_forward_pre_hook(activate))
    try:
        decode()
    finally:
        for handle in handles:
            handle.remove()
    return state["max"]


def test_peak_tensor_bounded_by_tile_not_image(tiny3):
    plan = local_plan(tiny3.decoder)
    H, F, tile = plan.halo, plan.scale, 32
    convs = [m for stage in tiny3.decoder.stages[plan.start :] for m in stage.modules() if isinstance(m, nn.Conv2d)]
    widest = max(max(c.in_channels, c.out_channels) for c in convs)
    bound = widest * ((tile // F + 2 * H) * F) ** 2  # widest map on the tile plus its halo, at full resolution
    sizes = []
    for side in (8, 16):  # outputs 128 and 256 pixels
        z = torch.randn(1, 4, side, side)
        tiled = _largest_tail_tensor(tiny3, lambda z=z: tiled_decode(tiny3, z, tile))
        untiled = _largest_tail_tensor(tiny3, lambda z=z: _untiled(tiny3, z))
        assert tiled <= bound < untiled, (tiled, bound, untiled)
        sizes.append(tiled)
    assert sizes[0] == sizes[1]  # the same for a 4x larger image


# ---------------------------------------------------------------------------------------------------------
# Automatic choice


def test_free_bytes_cuda_counts_reusable_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 700)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)
    assert td._free_bytes(torch.device("cuda", 0)) == 1500
    assert td._free_bytes(torch.device("cpu")) > 0


def test_auto_choice(tiny, monkeypatch):
    monkeypatch.setattr(td, "_free_bytes", lambda device: 0)  # however little memory: tiles of >= 256 pixels
    z = torch.randn(1, 4, 40, 2)  # 320 x 16 output
    assert choose_tile(tiny, z) == 256
    assert choose_tile(tiny, z[:, :, :20]) == 160  # the floor is larger than the image: one tile
    monkeypatch.setattr(td, "_MIN_AUTO_TILE", 4)  # the tiny images below are smaller than the floor

    z = torch.randn(2, 4, 6, 10)
    ref = _untiled(tiny, z)
    plan, size, itemsize = local_plan(tiny.decoder), (12, 20), 4
    untiled_bytes = 2 * tile_bytes(plan, *size, size, itemsize, halo=False) + ref.numel() * itemsize

    def fail(*args, **kwargs):
        raise AssertionError("tiled_decode called")

    # Plenty of memory: untiled.
    monkeypatch.setattr(td, "_free_bytes", lambda device: int(untiled_bytes / td._MEMORY_FRACTION) + 64)
    assert choose_tile(tiny, z) is None
    with monkeypatch.context() as m:
        m.setattr(td, "tiled_decode", fail)
        assert torch.equal(decode_auto(tiny, z), ref)

    # A quarter of that: tiled, with the largest tile whose estimate fits.
    budget = untiled_bytes / 4
    monkeypatch.setattr(td, "_free_bytes", lambda device: int(budget / td._MEMORY_FRACTION))
    tile = choose_tile(tiny, z)
    assert tile is not None and tile % plan.scale == 0 and 0 < tile < 20 * plan.scale
    t = tile // plan.scale

    def fits(t):
        return 2 * tile_bytes(plan, min(t, 12), min(t, 20), size, itemsize) + ref.numel() * itemsize <= budget

    assert fits(t) and not fits(t + 1)
    calls = []
    monkeypatch.setattr(td, "tiled_decode", lambda ae, z, tile: calls.append(tile) or tiled_decode(ae, z, tile))
    assert _rel_err(decode_auto(tiny, z), ref) <= 1e-5
    assert calls == [tile]
    assert _rel_err(tiled_decode(tiny, z), ref) <= 1e-5  # tile=None takes the same choice


# ---------------------------------------------------------------------------------------------------------
# Full size, on a GPU (run on the device; skipped without CUDA)


def _timed(fn) -> tuple[torch.Tensor, float, int]:
    """(result, seconds, peak bytes allocated above what was allocated before) of fn() on the GPU."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() - base


def _global_stages(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    x = decoder.stem(z)
    for stage in decoder.stages[: local_plan(decoder).start]:
        x = stage(x)
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("side", [2048, 4096])
def test_sana_tiled_decode_gpu(side, monkeypatch):
    """sana-1.x decoder (random weights) at side x side: tiled == untiled; the tail within 4 GiB; time."""
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        decoder = Decoder(DCAEConfig()).eval()
        for p in decoder.parameters():
            if p.ndim == 1:
                p.data.add_(0.2 * torch.randn_like(p))
        z = torch.randn(1, 32, side // 32, side // 32)
    plan, r = local_plan(decoder), {}
    monkeypatch.setattr(td, "_free_bytes", lambda device: 4 * 2**30 / td._MEMORY_FRACTION)

    def record(key, **values):
        r[key] = values
        print(side, key, json.dumps(values), flush=True)

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16) if side <= 2048 else (torch.bfloat16,):
            name = str(dtype).removeprefix("torch.")
            decoder.to(dtype)
            zz = z.to(dtype)
            for _ in range(2):  # the second run is timed (cuDNN heuristics, allocator warm)
                x, t_glob, m_glob = _timed(lambda zz=zz: _global_stages(decoder, zz))
            record(f"{name} global stages", seconds=t_glob, peak_gib=m_glob / 2**30)
            auto = choose_tile(decoder, zz)  # the tail within 4 GiB
            outs = {}
            for tile in sorted({1024, 2048, auto}):
                t_low = tile // plan.scale
                for _ in range(2):
                    out, t, m = _timed(lambda x=x, t_low=t_low: td.decode_tail(plan, x, t_low, 3))
                est = tile_bytes(plan, t_low, t_low, x.shape[2:], out.element_size()) / 2**30
                record(f"{name} tail, tile {tile}", auto=tile == auto, seconds=t, peak_gib=m / 2**30, est_gib=est)
                outs[tile] = out.cpu()
                del out
            for _ in range(2):
                _, t_tiled, _ = _timed(lambda zz=zz: tiled_decode(decoder, zz))
            del x
            for _ in range(2 if side <= 2048 else 1):
                ref, t_ref, m_ref = _timed(lambda zz=zz: decoder(zz))
            ref = ref.cpu()
            record(f"{name} untiled", seconds=t_ref, peak_gib=m_ref / 2**30)
            record(f"{name} tiled_decode (auto)", seconds=t_tiled, vs_untiled=t_tiled / t_ref)
            for tile, out in outs.items():
                record(f"{name} tile {tile} vs untiled", rel_err=_rel_err(out, ref), equal=torch.equal(out, ref))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"tiled_decode_{side}.json"), "w") as f:
            json.dump(r, f, indent=1)
    for name in ("float32", "bfloat16") if side <= 2048 else ("bfloat16",):
        errors = [v["rel_err"] for k, v in r.items() if k.startswith(name) and "vs untiled" in k]
        assert max(errors) <= (1e-5 if name == "float32" else 2e-2)
        auto = next(v for k, v in r.items() if k.startswith(f"{name} tail") and v["auto"])
        assert auto["peak_gib"] <= 4 and r[f"{name} tiled_decode (auto)"]["vs_untiled"] <= 1.3
