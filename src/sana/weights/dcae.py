"""DC-AE checkpoint layouts and configs: native (`sana.models.dcae`), diffusers `AutoencoderDC`, original.

"original" is efficientvit's `DCAE_HF` naming, as in mit-han-lab/dc-ae-f32c32-sana-1.x/model.safetensors
(e.g. `encoder.project_in.conv.weight`, `encoder.stages.0.op_list.0.main.conv1.conv.weight`). Conversions
are pure renames plus two reshapes: diffusers splits the fused 1x1 qkv conv into three Linear weights
`to_q/to_k/to_v` (contiguous thirds of the rows, NOT semantic q/k/v: the per-head [q|k|v] interleaving stays
inside each third), and the original stores the attention output projection as a 1x1 conv. Converters pop
every key and raise CheckpointError naming any key that is missing, left over or mis-shaped; round trips are
bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from sana.errors import CheckpointError, ConfigError
from sana.models.dcae import DCAE, BlockType, DCAEConfig
from sana.weights.io import StateDict

LAYOUTS = ("native", "diffusers", "original")

# Names inside one block: native suffix -> (diffusers suffix, original suffix).
_RES_NAMES = {
    "conv1.weight": ("conv1.weight", "main.conv1.conv.weight"),
    "conv1.bias": ("conv1.bias", "main.conv1.conv.bias"),
    "conv2.weight": ("conv2.weight", "main.conv2.conv.weight"),
    "norm.weight": ("norm.weight", "main.conv2.norm.weight"),
    "norm.bias": ("norm.bias", "main.conv2.norm.bias"),
}
_VIT_NAMES = {
    "attn.qkv.weight": (
        "attn.to_{}.weight",
        "context_module.main.qkv.conv.weight",
    ),  # diffusers: to_q/to_k/to_v
    "attn.proj.weight": ("attn.to_out.weight", "context_module.main.proj.conv.weight"),
    "attn.norm.weight": ("attn.norm_out.weight", "context_module.main.proj.norm.weight"),
    "attn.norm.bias": ("attn.norm_out.bias", "context_module.main.proj.norm.bias"),
    "mlp.conv_inverted.weight": (
        "conv_out.conv_inverted.weight",
        "local_module.main.inverted_conv.conv.weight",
    ),
    "mlp.conv_inverted.bias": ("conv_out.conv_inverted.bias", "local_module.main.inverted_conv.conv.bias"),
    "mlp.conv_depth.weight": ("conv_out.conv_depth.weight", "local_module.main.depth_conv.conv.weight"),
    "mlp.conv_depth.bias": ("conv_out.conv_depth.bias", "local_module.main.depth_conv.conv.bias"),
    "mlp.conv_point.weight": ("conv_out.conv_point.weight", "local_module.main.point_conv.conv.weight"),
    "mlp.norm.weight": ("conv_out.norm.weight", "local_module.main.point_conv.norm.weight"),
    "mlp.norm.bias": ("conv_out.norm.bias", "local_module.main.point_conv.norm.bias"),
    "attn.multiscale.{}.depthwise.weight": (
        "attn.to_qkv_multiscale.{}.proj_in.weight",
        "context_module.main.aggreg.{}.0.weight",
    ),
    "attn.multiscale.{}.pointwise.weight": (
        "attn.to_qkv_multiscale.{}.proj_out.weight",
        "context_module.main.aggreg.{}.1.weight",
    ),
}
# Keys outside the stages: native -> (diffusers, original); `{}` is weight or bias.
_TOP_NAMES = {
    "encoder.conv_in.{}": ("encoder.conv_in.{}", "encoder.project_in.conv.{}"),
    "encoder.conv_out.{}": ("encoder.conv_out.{}", "encoder.project_out.main.op_list.0.conv.{}"),
    "decoder.conv_in.{}": ("decoder.conv_in.{}", "decoder.project_in.main.conv.{}"),
    "decoder.norm_out.{}": ("decoder.norm_out.{}", "decoder.project_out.op_list.0.{}"),
    "decoder.conv_out.{}": ("decoder.conv_out.{}", "decoder.project_out.op_list.2.conv.{}"),
}
# Stage prefixes ({i}: reference stage index, {op}: position in the stage) and the resampling convs' suffixes.
_STAGE_PREFIX = {
    "diffusers": ("encoder.down_blocks.{i}.{op}.", "decoder.up_blocks.{i}.{op}."),
    "original": ("encoder.stages.{i}.op_list.{op}.", "decoder.stages.{i}.op_list.{op}."),
}
_RESAMPLE_SUFFIX = {"diffusers": ("conv.", "conv."), "original": ("main.conv.", "main.conv.conv.")}

# How a native tensor relates to its source tensor(s).
_COPY, _FUSE_QKV, _CONV1X1 = "copy", "fuse_qkv", "conv1x1"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown DC-AE layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def detect_layout(sd: StateDict) -> str | None:
    """ "native", "diffusers" or "original" from the key names; None if `sd` is no DC-AE state dict."""
    keys = list(sd)
    if (
        "encoder.project_in.conv.weight" in sd
        or "encoder.project_in.conv.conv.weight" in sd
        or any(k.startswith(("encoder.stages.", "decoder.stages.")) and ".op_list." in k for k in keys)
    ):
        return "original"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.stages.", "decoder.stages.")) and ".blocks." in k for k in keys):
        return "native"
    return None


# ----------------------------------------------------------------------------------------------------------
# State dicts


def _native_shapes(cfg: DCAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DCAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


_STAGE_KEY = re.compile(r"(encoder|decoder)\.stages\.(\d+)\.(?:blocks\.(\d+)|down\.conv|up\.conv)\.(.+)")


def _source(key: str, layout: str, cfg: DCAEConfig) -> tuple[tuple[str, ...], str]:
    """The key(s) a native key has in `layout`, and how the tensors relate."""
    if layout == "native":
        return (key,), _COPY
    col = 0 if layout == "diffusers" else 1
    top = key.rsplit(".", 1)
    if f"{top[0]}.{{}}" in _TOP_NAMES:
        return (_TOP_NAMES[f"{top[0]}.{{}}"][col].format(top[1]),), _COPY
    m = _STAGE_KEY.fullmatch(key)
    if m is None:
        raise CheckpointError(f"no {layout} name for native key {key}")
    side, stage, block, rest = m.groups()
    S = cfg.num_stages
    i = int(stage) if side == "encoder" else S - 1 - int(stage)  # native decoder stages run deepest first
    prefix = _STAGE_PREFIX[layout][side == "decoder"]
    if block is None:  # the stride-2 down conv ends an encoder stage, the up conv opens a decoder stage
        op = cfg.encoder_depths[i] if side == "encoder" else 0
        return (prefix.format(i=i, op=op) + _RESAMPLE_SUFFIX[layout][side == "decoder"] + rest,), _COPY
    op = int(block) + (1 if side == "decoder" and i < S - 1 else 0)
    prefix = prefix.format(i=i, op=op)
    template = re.sub(r"\.\d+\.", ".{}.", rest)  # attn.multiscale.{s}.* -> its table entry
    names = _RES_NAMES.get(template) or _VIT_NAMES.get(template)
    if names is None:
        raise CheckpointError(f"no {layout} name for native key {key}")
    if template == "attn.qkv.weight" and layout == "diffusers":
        return tuple(prefix + names[col].format(x) for x in "qkv"), _FUSE_QKV
    name = prefix + names[col].format(*re.findall(r"\.(\d+)\.", rest))
    return (name,), _CONV1X1 if template == "attn.proj.weight" and layout == "original" else _COPY


def _source_shape(native_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == _FUSE_QKV:  # (3C, C, 1, 1) -> three (C, C)
        return (native_shape[0] // 3, native_shape[1])
    if kind == _CONV1X1:  # (C, nC) -> (C, nC, 1, 1)
        return (*native_shape, 1, 1)
    return native_shape


def _convert(sd: StateDict, layout: str, cfg: DCAEConfig, to_native: bool) -> StateDict:
    _check_layout(layout)
    src = dict(sd)  # popped: whatever is left at the end is unexpected
    out: StateDict = {}
    missing, shapes = [], []
    for key, native_shape in _native_shapes(cfg).items():
        names, kind = _source(key, layout, cfg)
        inputs = names if to_native else (key,)
        want = _source_shape(native_shape, kind) if to_native else native_shape
        absent = [n for n in inputs if n not in src]
        tensors = [src.pop(n) for n in inputs if n in src]
        if absent:
            missing += absent
            continue
        bad = [
            f"{n} has shape {tuple(t.shape)}, expected {want}"
            for n, t in zip(inputs, tensors, strict=True)
            if tuple(t.shape) != want
        ]
        if bad:
            shapes += bad
            continue
        if to_native:
            out[key] = _join(tensors, kind)
        else:
            out.update(zip(names, _split(tensors[0], kind), strict=True))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_few(missing)}")
    if src:
        problems.append(f"unexpected {len(src)} key(s): {_few(sorted(src))}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped: {'; '.join(shapes[:3])}")
    if problems:
        where = f"DC-AE {layout} state dict" if to_native else f"DC-AE native state dict (to {layout})"
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    return out


def _join(tensors: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == _FUSE_QKV:  # to_q, to_k, to_v (C, C) -> qkv (3C, C, 1, 1)
        return torch.cat(tensors, dim=0)[:, :, None, None]
    if kind == _CONV1X1:  # (C, nC, 1, 1) -> (C, nC)
        return tensors[0].flatten(1)
    return tensors[0]


def _split(t: torch.Tensor, kind: str) -> list[torch.Tensor]:
    if kind == _FUSE_QKV:
        return [x.flatten(1) for x in t.chunk(3, dim=0)]  # views of the fused weight (io.py copies on save)
    if kind == _CONV1X1:
        return [t[:, :, None, None]]
    return [t]


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def to_native(sd: StateDict, layout: str, cfg: DCAEConfig) -> StateDict:
    """A state dict in `layout` as this package's DCAE state dict (every key consumed, shapes checked)."""
    return _convert(sd, layout, cfg, to_native=True)


def from_native(sd: StateDict, layout: str, cfg: DCAEConfig) -> StateDict:
    """A DCAE state dict in `layout` ("diffusers": AutoencoderDC; "original": efficientvit DCAE_HF)."""
    return _convert(sd, layout, cfg, to_native=False)


# ----------------------------------------------------------------------------------------------------------
# Configs

_BLOCK_NAMES = {BlockType.RES: "ResBlock", BlockType.VIT: "EfficientViTBlock"}

# AutoencoderDC.__init__ defaults (diffusers 0.42), applied to fields a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}


def config_from_diffusers(cfg: dict) -> DCAEConfig:
    """DCAEConfig from an AutoencoderDC config.json; CheckpointError names the field of an unsupported one."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise CheckpointError(f"AutoencoderDC config: unknown field(s) {unknown}")
    if cfg.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
        raise CheckpointError(f"config _class_name={cfg['_class_name']!r}, expected 'AutoencoderDC'")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}

    def require(field: str, ok: Callable[[object], bool], supported: str) -> None:
        if not ok(c[field]):
            raise CheckpointError(f"AutoencoderDC config: {field}={c[field]!r} is not supported ({supported})")

    widths = tuple(c["encoder_block_out_channels"])
    S = len(widths)
    require("downsample_block_type", lambda v: str(v).lower() == "conv", "only 'Conv': strided-conv downsampling")
    require("upsample_block_type", lambda v: v == "interpolate", "only 'interpolate'")
    require("decoder_norm_types", lambda v: _per_stage(v, S) == ("rms_norm",) * S, "only 'rms_norm'")
    require("decoder_act_fns", lambda v: _per_stage(v, S) == ("silu",) * S, "only 'silu'")
    require("decoder_conv_act_fn", lambda v: v == "relu", "only 'relu'")
    require("encoder_out_shortcut", lambda v: v is True, "only true")
    require("decoder_in_shortcut", lambda v: v is True, "only true")
    require("decoder_block_out_channels", lambda v: tuple(v) == widths, "must equal encoder_block_out_channels")
    for side in ("encoder", "decoder"):
        require(
            f"{side}_layers_per_block",
            lambda v: len(v) == S and min(v) >= 1,
            f"one depth >= 1 per stage, {S} stages",
        )
        require(
            f"{side}_block_types",
            lambda v: all(t in _BLOCK_NAMES.values() for t in _per_stage(v, S)),
            "ResBlock or EfficientViTBlock per stage",
        )
        require(f"{side}_qkv_multiscales", lambda v: len(v) == S, f"{S} stages")
    kinds = {name: kind for kind, name in _BLOCK_NAMES.items()}
    types = {side: tuple(kinds[t] for t in _per_stage(c[f"{side}_block_types"], S)) for side in ("encoder", "decoder")}
    # diffusers ignores the multi-scale kernels of ResBlock stages; so do we
    scales = {
        side: tuple(
            tuple(ks) if t is BlockType.VIT else ()
            for t, ks in zip(types[side], c[f"{side}_qkv_multiscales"], strict=True)
        )
        for side in ("encoder", "decoder")
    }
    try:
        return DCAEConfig(
            in_channels=c["in_channels"],
            latent_channels=c["latent_channels"],
            widths=widths,
            encoder_depths=tuple(c["encoder_layers_per_block"]),
            decoder_depths=tuple(c["decoder_layers_per_block"]),
            encoder_block_types=types["encoder"],
            decoder_block_types=types["decoder"],
            encoder_qkv_multiscales=scales["encoder"],
            decoder_qkv_multiscales=scales["decoder"],
            head_dim=c["attention_head_dim"],
            scaling_factor=float(c["scaling_factor"]),
        )
    except ConfigError as e:
        raise CheckpointError(f"AutoencoderDC config: {e}") from e


def _per_stage(value, stages: int) -> tuple:
    return (value,) * stages if isinstance(value, str) else tuple(value)


def config_to_diffusers(cfg: DCAEConfig) -> dict:
    """The AutoencoderDC config.json describing `cfg`."""
    return {
        "_class_name": "AutoencoderDC",
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.head_dim,
        "encoder_block_types": [_BLOCK_NAMES[t] for t in cfg.encoder_block_types],
        "decoder_block_types": [_BLOCK_NAMES[t] for t in cfg.decoder_block_types],
        "encoder_block_out_channels": list(cfg.widths),
        "decoder_block_out_channels": list(cfg.widths),
        "encoder_layers_per_block": list(cfg.encoder_depths),
        "decoder_layers_per_block": list(cfg.decoder_depths),
        "encoder_qkv_multiscales": [list(ks) for ks in cfg.encoder_qkv_multiscales],
        "decoder_qkv_multiscales": [list(ks) for ks in cfg.decoder_qkv_multiscales],
        "upsample_block_type": "interpolate",
        "downsample_block_type": "Conv",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "encoder_out_shortcut": True,
        "decoder_in_shortcut": True,
        "decoder_conv_act_fn": "relu",
        "scaling_factor": cfg.scaling_factor,
    }


# Per layout, a key inside a stage: (side, stage, op index, block suffix).
_OP_KEY = {
    "native": re.compile(r"(encoder|decoder)\.stages\.(\d+)\.blocks\.(\d+)\.(.+)"),
    "diffusers": re.compile(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(\d+)\.(.+)"),
    "original": re.compile(r"(encoder|decoder)\.stages\.(\d+)\.op_list\.(\d+)\.(.+)"),
}


def _native_suffix(rest: str, layout: str) -> str | None:
    """A block suffix of `layout` in native words (to_q/to_k/to_v -> attn.qkv.weight); None for resampling."""
    if layout == "native":
        return rest
    col = 0 if layout == "diffusers" else 1
    for native, names in (*_RES_NAMES.items(), *_VIT_NAMES.items()):
        # the `{}` slot is a scale index, or the q/k/v of diffusers' to_q/to_k/to_v
        slot = r"(\d+)" if "multiscale" in native else "[qkv]"
        m = re.fullmatch(re.escape(names[col]).replace(r"\{\}", slot), rest)
        if m is not None:
            return native.format(*m.groups())
    return None


def config_from_state_dict(sd: StateDict, layout: str) -> DCAEConfig:
    """Infer the architecture from key names and shapes (original DC-AE files carry no usable config).

    The scaling factor is not in the weights: the result carries the sana f32c32 default (0.41407). The head
    width comes from the multi-scale 1x1 convs; without any, the default (32) is assumed.
    """
    _check_layout(layout)
    if "encoder.project_in.conv.conv.weight" in sd or "encoder.conv_in.conv.weight" in sd:
        raise CheckpointError(
            "a DC-AE in/mix checkpoint (pixel-unshuffle input conv): only sana variants are supported"
        )
    col = {"native": None, "diffusers": 0, "original": 1}[layout]
    top = {}
    for native in ("encoder.conv_in.{}", "encoder.conv_out.{}"):
        name = native.format("weight") if col is None else _TOP_NAMES[native][col].format("weight")
        if name not in sd:
            raise CheckpointError(f"DC-AE {layout} state dict has no {name}")
        top[native] = tuple(sd[name].shape)
    # stages[side][stage][op] = {native suffix: shape}; resampling ops are skipped
    stages: dict[str, dict[int, dict[int, dict[str, tuple[int, ...]]]]] = {"encoder": {}, "decoder": {}}
    for key, t in sd.items():
        m = _OP_KEY[layout].fullmatch(key)
        if m is None:
            continue
        side, stage, op, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        suffix = _native_suffix(rest, layout)
        if suffix is not None:
            stages[side].setdefault(stage, {}).setdefault(op, {})[suffix] = tuple(t.shape)
    S = max(stages["encoder"], default=-1) + 1
    if S < 2 or sorted(stages["encoder"]) != list(range(S)) or sorted(stages["decoder"]) != list(range(S)):
        raise CheckpointError(
            f"DC-AE {layout} state dict: cannot find the encoder/decoder stages (found encoder stages "
            f"{sorted(stages['encoder'])}, decoder stages {sorted(stages['decoder'])})"
        )
    # found[side] = [(reference stage index, width, block type, multi-scale kernels, depth)]
    found: dict[str, list[tuple[int, int, BlockType, tuple[int, ...], int]]] = {"encoder": [], "decoder": []}
    head_dims = set()
    for side in ("encoder", "decoder"):
        for stage in range(S):
            i = S - 1 - stage if (side == "decoder" and layout == "native") else stage
            ops = stages[side][stage]
            kinds = {_block_kind(names, f"{side} stage {i}") for names in ops.values()}
            if len(kinds) != 1:
                raise CheckpointError(f"DC-AE {layout} state dict: {side} stage {i} mixes block types")
            kind = kinds.pop()
            first = ops[min(ops)]
            width = first["conv1.weight"][0] if kind is BlockType.RES else first["attn.qkv.weight"][1]
            n_scales = sum(1 for s in first if s.endswith("depthwise.weight"))
            ks = tuple(first[f"attn.multiscale.{s}.depthwise.weight"][-1] for s in range(n_scales))
            head_dims |= {first[f"attn.multiscale.{s}.pointwise.weight"][1] for s in range(n_scales)}
            found[side].append((i, width, kind, ks, len(ops)))
        found[side].sort()
    widths = tuple(w for _, w, _, _, _ in found["encoder"])
    if tuple(w for _, w, _, _, _ in found["decoder"]) != widths:
        raise CheckpointError(f"DC-AE {layout} state dict: decoder widths differ from encoder widths {widths}")
    if len(head_dims) > 1:
        raise CheckpointError(f"DC-AE {layout} state dict: several head widths {sorted(head_dims)}")
    try:
        return DCAEConfig(
            in_channels=top["encoder.conv_in.{}"][1],
            latent_channels=top["encoder.conv_out.{}"][0],
            widths=widths,
            encoder_depths=tuple(n for *_, n in found["encoder"]),
            decoder_depths=tuple(n for *_, n in found["decoder"]),
            encoder_block_types=tuple(k for _, _, k, _, _ in found["encoder"]),
            decoder_block_types=tuple(k for _, _, k, _, _ in found["decoder"]),
            encoder_qkv_multiscales=tuple(ks for _, _, _, ks, _ in found["encoder"]),
            decoder_qkv_multiscales=tuple(ks for _, _, _, ks, _ in found["decoder"]),
            head_dim=head_dims.pop() if head_dims else DCAEConfig.head_dim,
        )
    except ConfigError as e:
        raise CheckpointError(f"DC-AE {layout} state dict: inferred an invalid config: {e}") from e


def _block_kind(names: dict[str, tuple[int, ...]], where: str) -> BlockType:
    if "conv1.weight" in names:
        return BlockType.RES
    if "attn.qkv.weight" in names:
        return BlockType.VIT
    raise CheckpointError(f"DC-AE state dict: {where} has a block of unknown type (keys {sorted(names)[:3]})")
