"""Transformer checkpoints: native <-> diffusers <-> original NVlabs layouts, and configs from files.

A layout is described once, as a table of (native key, source keys, op) built from the config; converting in
either direction walks the table, pops every key it consumes and fails on anything left over or missing.
"""

from __future__ import annotations

import re

import torch

from sana.errors import CheckpointError
from sana.models.transformer import TransformerConfig
from sana.weights.io import StateDict

LAYOUTS = ("native", "diffusers", "original")

# Keys the original checkpoints carry that no layout maps: the stored PE (recomputed at run time), the
# learned null caption (our pipeline encodes "" instead, as diffusers) and Sprint's training-only logvar head.
ORIGINAL_IGNORED = re.compile(r"^(pos_embed|y_embedder\.y_embedding|logvar_linear\.(weight|bias))$")

# Original checkpoints store no cross-attention head count; the released widths have these.
_CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}
# Released 2K/4K models re-enable PE; the base size comes from the stored pos_embed buffer.
_PE_BY_SAMPLE_SIZE = {64: 1.0, 128: 2.0}


def _table(cfg: TransformerConfig, layout: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(native key, keys in `layout`, op) for every tensor; op "conv1x1" means 2-D native vs 4-D there."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    rows: list[tuple[str, tuple[str, ...], str]] = []

    def add(native: str, other: str | tuple[str, ...], op: str = "copy", params=("weight", "bias")):
        for p in params:
            srcs = (other,) if isinstance(other, str) else other
            rows.append((f"{native}.{p}", tuple(f"{s}.{p}" for s in srcs), op if p == "weight" else "copy"))

    if layout == "native":
        return [(k, (k,), "copy") for k in _native_keys(cfg)]
    diff = layout == "diffusers"
    add("patch_embed", "patch_embed.proj" if diff else "x_embedder.proj")
    if diff:
        time_prefix = "time_embed." if cfg.guidance_embeds else "time_embed.emb."
        add("time_embed.fc1", time_prefix + "timestep_embedder.linear_1")
        add("time_embed.fc2", time_prefix + "timestep_embedder.linear_2")
        if cfg.guidance_embeds:
            add("guidance_embed.fc1", "time_embed.guidance_embedder.linear_1")
            add("guidance_embed.fc2", "time_embed.guidance_embedder.linear_2")
        add("t_block", "time_embed.linear")
        add("caption_proj.fc1", "caption_projection.linear_1")
        add("caption_proj.fc2", "caption_projection.linear_2")
        add("caption_norm", "caption_norm", params=("weight",))
    else:
        add("time_embed.fc1", "t_embedder.mlp.0")
        add("time_embed.fc2", "t_embedder.mlp.2")
        if cfg.guidance_embeds:
            add("guidance_embed.fc1", "cfg_embedder.mlp.0")
            add("guidance_embed.fc2", "cfg_embedder.mlp.2")
        add("t_block", "t_block.1")
        add("caption_proj.fc1", "y_embedder.y_proj.fc1")
        add("caption_proj.fc2", "y_embedder.y_proj.fc2")
        add("caption_norm", "attention_y_norm", params=("weight",))
    for i in range(cfg.depth):
        n, o = f"blocks.{i}", (f"transformer_blocks.{i}" if diff else f"blocks.{i}")
        rows.append((f"{n}.scale_shift_table", (f"{o}.scale_shift_table",), "copy"))
        if diff:
            add(f"{n}.attn.qkv", (f"{o}.attn1.to_q", f"{o}.attn1.to_k", f"{o}.attn1.to_v"), params=("weight",))
            add(f"{n}.attn.proj", f"{o}.attn1.to_out.0")
            add(f"{n}.cross_attn.q", f"{o}.attn2.to_q")
            add(f"{n}.cross_attn.kv", (f"{o}.attn2.to_k", f"{o}.attn2.to_v"))
            add(f"{n}.cross_attn.proj", f"{o}.attn2.to_out.0")
            if cfg.qk_norm:
                for attn_n, attn_o in (("attn", "attn1"), ("cross_attn", "attn2")):
                    add(f"{n}.{attn_n}.q_norm", f"{o}.{attn_o}.norm_q", params=("weight",))
                    add(f"{n}.{attn_n}.k_norm", f"{o}.{attn_o}.norm_k", params=("weight",))
            add(f"{n}.ffn.inverted", f"{o}.ff.conv_inverted", "conv1x1")
            add(f"{n}.ffn.depthwise", f"{o}.ff.conv_depth")
            add(f"{n}.ffn.point", f"{o}.ff.conv_point", "conv1x1", params=("weight",))
        else:
            add(f"{n}.attn.qkv", f"{o}.attn.qkv", params=("weight",))
            add(f"{n}.attn.proj", f"{o}.attn.proj")
            add(f"{n}.cross_attn.q", f"{o}.cross_attn.q_linear")
            add(f"{n}.cross_attn.kv", f"{o}.cross_attn.kv_linear")
            add(f"{n}.cross_attn.proj", f"{o}.cross_attn.proj")
            if cfg.qk_norm:
                for attn in ("attn", "cross_attn"):
                    add(f"{n}.{attn}.q_norm", f"{o}.{attn}.q_norm", params=("weight",))
                    add(f"{n}.{attn}.k_norm", f"{o}.{attn}.k_norm", params=("weight",))
            add(f"{n}.ffn.inverted", f"{o}.mlp.inverted_conv.conv", "conv1x1")
            add(f"{n}.ffn.depthwise", f"{o}.mlp.depth_conv.conv")
            add(f"{n}.ffn.point", f"{o}.mlp.point_conv.conv", "conv1x1", params=("weight",))
    rows.append(
        ("final.scale_shift_table", ("scale_shift_table" if diff else "final_layer.scale_shift_table",), "copy")
    )
    add("final.linear", "proj_out" if diff else "final_layer.linear")
    return rows


def _native_keys(cfg: TransformerConfig) -> list[str]:
    from sana.models.transformer import SanaTransformer

    with torch.device("meta"):
        return list(SanaTransformer(cfg).state_dict())


def detect_layout(sd: StateDict) -> str | None:
    """Which layout a transformer state dict is in, from marker keys; None if it is not a Sana transformer."""
    if "patch_embed.weight" in sd and "t_block.weight" in sd:
        return "native"
    if "patch_embed.proj.weight" in sd and "time_embed.linear.weight" in sd:
        return "diffusers"
    if "x_embedder.proj.weight" in sd and "t_block.1.weight" in sd:
        return "original"
    return None


def to_native(sd: StateDict, layout: str, cfg: TransformerConfig, source: str = "") -> StateDict:
    """Convert a state dict from `layout` to the native layout, consuming every key (strict)."""
    sd = dict(sd)
    if layout == "original":
        sd = {k: v for k, v in sd.items() if not ORIGINAL_IGNORED.match(k)}
    out, missing = {}, []
    for native, srcs, op in _table(cfg, layout):
        if any(s not in sd for s in srcs):
            missing += [s for s in srcs if s not in sd]
            continue
        parts = [sd.pop(s) for s in srcs]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if op == "conv1x1":
            if t.ndim != 4 or t.shape[2:] != (1, 1):
                raise CheckpointError(f"{_at(source)}{srcs[0]} has shape {tuple(t.shape)}, expected a 1x1 conv weight")
            t = t.reshape(t.shape[0], t.shape[1])
        out[native] = t
    _fail_on_leftovers(source, layout, missing, sd)
    return out


def from_native(sd: StateDict, layout: str, cfg: TransformerConfig, source: str = "") -> StateDict:
    """Convert a native state dict to `layout` (the exact inverse of `to_native`)."""
    sd = dict(sd)
    out, missing = {}, []
    for native, srcs, op in _table(cfg, layout):
        if native not in sd:
            missing.append(native)
            continue
        t = sd.pop(native)
        if op == "conv1x1":
            t = t[:, :, None, None]
        for s, part in zip(srcs, t.chunk(len(srcs), dim=0) if len(srcs) > 1 else (t,), strict=True):
            out[s] = part
    _fail_on_leftovers(source, "native", missing, sd)
    return out


def _fail_on_leftovers(source: str, layout: str, missing: list[str], left: StateDict) -> None:
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) of the {layout} layout: {', '.join(missing[:5])}")
    if left:
        keys = sorted(left)
        problems.append(f"unexpected {len(keys)} key(s): {', '.join(keys[:5])}")
    if problems:
        raise CheckpointError(_at(source) + "; ".join(problems))


def _at(source: str) -> str:
    return f"{source}: " if source else ""


# ---------------------------------------------------------------------------------------------------------
# Configs


def config_from_diffusers(d: dict, source: str = "config.json") -> TransformerConfig:
    """TransformerConfig from a diffusers SanaTransformer2DModel config.json (defaults as diffusers' __init__)."""

    def get(key, default):
        return d.get(key, default)

    unsupported = {
        "attention_bias": (False,),
        "norm_elementwise_affine": (False,),
        "norm_eps": (1e-6,),
        "dropout": (0.0, 0),
        "qk_norm": (None, "rms_norm_across_heads"),
    }
    for key, allowed in unsupported.items():
        if key in d and d[key] not in allowed:
            raise CheckpointError(f"{source}: {key}={d[key]!r} is not supported (supported: {list(allowed)})")
    heads, head_dim = get("num_attention_heads", 70), get("attention_head_dim", 32)
    C = heads * head_dim
    xheads, xdim = get("num_cross_attention_heads", 20), get("cross_attention_head_dim", 112)
    if xheads * xdim != C or get("cross_attention_dim", 2240) != C:
        raise CheckpointError(
            f"{source}: cross-attention width {xheads}x{xdim} (cross_attention_dim "
            f"{get('cross_attention_dim', 2240)}) must equal the model width {heads}x{head_dim}={C}"
        )
    guidance = bool(get("guidance_embeds", False))
    in_ch = get("in_channels", 32)
    try:
        return TransformerConfig(
            hidden_size=C,
            depth=get("num_layers", 20),
            linear_head_dim=head_dim,
            cross_heads=xheads,
            in_channels=in_ch,
            out_channels=get("out_channels", None) or in_ch,
            caption_channels=get("caption_channels", 2304),
            mlp_ratio=float(get("mlp_ratio", 2.5)),
            patch_size=get("patch_size", 1),
            sample_size=get("sample_size", 32),
            pe_interpolation=None if get("interpolation_scale", None) is None else float(d["interpolation_scale"]),
            qk_norm=get("qk_norm", None) == "rms_norm_across_heads",
            guidance_embeds=guidance,
            guidance_embeds_scale=float(get("guidance_embeds_scale", 0.1)),
            # diffusers' SanaPipeline feeds int(1000 sigma) * timestep_scale; the Sprint pipeline feeds t itself.
            time_scale=1.0 if guidance else 1000.0 * float(get("timestep_scale", 1.0)),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_diffusers(cfg: TransformerConfig) -> dict:
    """A config.json that diffusers' SanaTransformer2DModel accepts, for `cfg`."""
    return {
        "_class_name": "SanaTransformer2DModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_attention_heads": cfg.hidden_size // cfg.linear_head_dim,
        "attention_head_dim": cfg.linear_head_dim,
        "num_layers": cfg.depth,
        "num_cross_attention_heads": cfg.cross_heads,
        "cross_attention_head_dim": cfg.hidden_size // cfg.cross_heads,
        "cross_attention_dim": cfg.hidden_size,
        "caption_channels": cfg.caption_channels,
        "mlp_ratio": cfg.mlp_ratio,
        "dropout": 0.0,
        "attention_bias": False,
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": cfg.pe_interpolation,
        "guidance_embeds": cfg.guidance_embeds,
        "guidance_embeds_scale": cfg.guidance_embeds_scale,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "timestep_scale": 1.0 if cfg.guidance_embeds else cfg.time_scale / 1000.0,
    }


def config_from_original(sd: StateDict, source: str = "checkpoint") -> TransformerConfig:
    """Infer the config of an original NVlabs checkpoint from its keys and shapes.

    The file stores neither the cross-attention head count nor whether PE is used: both follow the released
    models (heads by width; PE for the 2K/4K base sizes read from the stored `pos_embed` buffer).
    """
    try:
        w = sd["x_embedder.proj.weight"]  # (C, Cin, p, p)
        C, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        hidden = sd["blocks.0.mlp.point_conv.conv.weight"].shape[1]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
        caption = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source}: not a complete original Sana transformer checkpoint ({e})") from e
    if C not in _CROSS_HEADS_BY_WIDTH:
        raise CheckpointError(
            f"{source}: width {C} is not a released Sana width, so the cross-attention head count is unknown; "
            f"pass config= (a TransformerConfig or preset name)"
        )
    sample_size = 32
    if "pos_embed" in sd:
        sample_size = round(sd["pos_embed"].shape[1] ** 0.5) * p
    guidance = "cfg_embedder.mlp.0.weight" in sd
    return TransformerConfig(
        hidden_size=C,
        depth=depth,
        cross_heads=_CROSS_HEADS_BY_WIDTH[C],
        in_channels=in_ch,
        out_channels=out_ch,
        caption_channels=caption,
        mlp_ratio=hidden / C,
        patch_size=p,
        sample_size=sample_size,
        pe_interpolation=_PE_BY_SAMPLE_SIZE.get(sample_size),
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        guidance_embeds=guidance,
        time_scale=1.0 if guidance else 1000.0,
    )


def config_from_state_dict(sd: StateDict, layout: str, source: str = "checkpoint") -> TransformerConfig:
    """Infer the config of a state dict in `layout` (original, or native by way of the original key names)."""
    if layout == "original":
        return config_from_original(sd, source)
    if layout == "native":
        # Native files carry their config as metadata; without it, read the shapes through the original names.
        probe = {o[0]: sd[n] for n, o, _ in _table(_probe_config(sd), "original") if n in sd}
        cfg = config_from_original(probe, source)
        return cfg
    raise CheckpointError(f"{source}: a {layout} checkpoint needs its config.json")


def _probe_config(sd: StateDict) -> TransformerConfig:
    """A config with the native file's depth and flags, enough to name its keys (widths do not matter)."""
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=0)
    return TransformerConfig(
        hidden_size=32,
        depth=depth,
        cross_heads=1,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        guidance_embeds="guidance_embed.fc1.weight" in sd,
    )
