"""`load_transformer`, `load_autoencoder`, saving in any layout, and `convert` between layouts.

A source is a diffusers folder (config.json + safetensors, sharded too, or a whole pipeline folder), an original
NVlabs checkpoint (.pth with or without its "state_dict" wrapper, or .safetensors), or a native file (one
.safetensors whose metadata holds the config). Loading is strict and builds the model on the meta device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sana import dataclass_io
from sana.errors import CheckpointError
from sana.models.dcae import DCAE, DCAE_PRESETS, DCAEConfig
from sana.models.transformer import TRANSFORMER_PRESETS, SanaTransformer, TransformerConfig
from sana.weights import dcae as aconv
from sana.weights import transformer as tconv
from sana.weights.io import (
    StateDict,
    atomic_write,
    find_weights_in_folder,
    read_json,
    read_weights,
    strip_prefixes,
    write_json,
    write_safetensors,
)
from sana.weights.strict import build_and_load, check_keys

NATIVE_FORMAT_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """What differs between loading a transformer and an autoencoder."""

    name: str  # "transformer" | "autoencoder": stored in native metadata
    model_cls: type[nn.Module]
    config_cls: type
    presets: dict[str, Any]
    converters: ModuleType  # detect_layout, config_from_diffusers, config_to_diffusers, to_native, from_native, ...
    diffusers_class: str
    pipeline_subfolder: str

    def preset(self, name: str):
        if name not in self.presets:
            raise CheckpointError(f"unknown {self.name} preset {name!r}; known: {', '.join(sorted(self.presets))}")
        return self.presets[name]


TRANSFORMER = ModelKind(
    "transformer",
    SanaTransformer,
    TransformerConfig,
    TRANSFORMER_PRESETS,
    tconv,
    "SanaTransformer2DModel",
    "transformer",
)
AUTOENCODER = ModelKind("autoencoder", DCAE, DCAEConfig, DCAE_PRESETS, aconv, "AutoencoderDC", "vae")
KINDS = (TRANSFORMER, AUTOENCODER)


@dataclasses.dataclass
class Checkpoint:
    """A state dict read from disk, with its layout and config."""

    sd: StateDict
    layout: str
    config: Any
    source: str


def read_checkpoint(src: str | Path, kind: ModelKind, config: Any = None) -> Checkpoint:
    """Read `src` as a `kind` checkpoint of any layout; `config` (instance or preset name) overrides inference."""
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if isinstance(config, str):
        config = kind.preset(config)
    conv = kind.converters
    diffusers_cfg = None
    if path.is_dir():
        if (path / "model_index.json").exists() and (path / kind.pipeline_subfolder).is_dir():
            path = path / kind.pipeline_subfolder
        if (path / "config.json").exists():
            diffusers_cfg = read_json(path / "config.json")
        path = find_weights_in_folder(path)
    elif (path.parent / "config.json").exists():
        diffusers_cfg = read_json(path.parent / "config.json")
    source = str(path)
    sd, metadata = read_weights(path)

    if "sana_model" in metadata:  # native
        if metadata["sana_model"] != kind.name:
            raise CheckpointError(f"{source} holds a {metadata['sana_model']}, not a {kind.name}")
        cfg = config or dataclass_io.from_json(kind.config_cls, metadata.get("sana_config", "{}"), source)
        return Checkpoint(sd, "native", cfg, source)

    sd = strip_prefixes(sd)
    layout = conv.detect_layout(sd)
    if layout is None:
        others = [k.name for k in KINDS if k is not kind and k.converters.detect_layout(sd) is not None]
        hint = f"; it looks like a {others[0]} checkpoint" if others else ""
        sample = ", ".join(sorted(sd)[:3])
        raise CheckpointError(f"{source}: unknown checkpoint layout for a {kind.name} (keys: {sample}, ...){hint}")
    if config is None:
        if layout == "diffusers":
            if diffusers_cfg is None:
                raise CheckpointError(f"{source}: diffusers-layout weights need the config.json beside them")
            cls_name = diffusers_cfg.get("_class_name")
            if cls_name not in (None, kind.diffusers_class):
                raise CheckpointError(f"{source}: config.json describes a {cls_name}, not a {kind.diffusers_class}")
            config = conv.config_from_diffusers(diffusers_cfg)
        else:
            config = conv.config_from_state_dict(sd, layout)
    return Checkpoint(sd, layout, config, source)


def _native_state_dict(ckpt: Checkpoint, kind: ModelKind) -> StateDict:
    try:
        return kind.converters.to_native(ckpt.sd, ckpt.layout, ckpt.config)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.source}: {e}") from e


def load_model(
    src: str | Path,
    kind: ModelKind,
    config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    ckpt = read_checkpoint(src, kind, config)
    sd = _native_state_dict(ckpt, kind)
    cls = kind.model_cls
    return build_and_load(lambda: cls(ckpt.config), sd, ckpt.source, device, dtype)


def load_transformer(src, config=None, device=None, dtype=None):
    """Load a Sana transformer from a diffusers folder, an original .pth/.safetensors or a native file."""
    return load_model(src, TRANSFORMER, config, device, dtype)


def load_autoencoder(src, config=None, device=None, dtype=None):
    """Load a DC-AE from a diffusers folder, an original DC-AE safetensors/.pth or a native file."""
    return load_model(src, AUTOENCODER, config, device, dtype)


def kind_of(model: nn.Module) -> ModelKind:
    for kind in KINDS:
        if isinstance(model, kind.model_cls):
            return kind
    raise TypeError(f"cannot save a {type(model).__name__}")


def write_checkpoint(sd: StateDict, config: Any, kind: ModelKind, dst: str | Path, layout: str) -> Path:
    """Write a native state dict as `layout`: native -> one .safetensors; diffusers -> a folder;
    original -> .safetensors, or .pth with the NVlabs {"state_dict": ...} wrapper."""
    dst = Path(dst)
    conv = kind.converters
    if layout == "native":
        if dst.suffix != ".safetensors":
            raise CheckpointError(f"{dst}: a native checkpoint is one .safetensors file")
        meta = {
            "sana_format": NATIVE_FORMAT_VERSION,
            "sana_model": kind.name,
            "sana_config": dataclass_io.to_json(config),
        }
        write_safetensors(dst, sd, meta)
        return dst
    out = conv.from_native(sd, layout, config)
    if layout == "diffusers":
        if dst.suffix:
            raise CheckpointError(f"{dst}: a diffusers checkpoint is a folder; give a folder path")
        write_safetensors(dst / "diffusion_pytorch_model.safetensors", out)
        write_json(dst / "config.json", conv.config_to_diffusers(config))
        return dst
    if layout == "original":
        if dst.suffix == ".pth":
            tensors = {k: v.contiguous().clone() for k, v in out.items()}
            atomic_write(dst, lambda tmp: torch.save({"state_dict": tensors}, tmp))
        elif dst.suffix == ".safetensors":
            write_safetensors(dst, out)
        else:
            raise CheckpointError(f"{dst}: an original checkpoint is a .pth or .safetensors file")
        return dst
    raise CheckpointError(f"unknown layout {layout!r}; expected native, diffusers or original")


def save_model(model: nn.Module, dst: str | Path, layout: str = "native") -> Path:
    """Save a SanaTransformer or DCAE in `layout` (see write_checkpoint)."""
    kind = kind_of(model)
    return write_checkpoint(model.state_dict(), model.config, kind, dst, layout)


def detect_kind(src: str | Path, config: Any = None) -> ModelKind:
    """Whether `src` (or the given config) is a transformer or an autoencoder."""
    for kind in KINDS:
        if config is not None and isinstance(config, kind.config_cls):
            return kind
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").exists():
            raise CheckpointError(f"{src} is a whole pipeline; name its transformer/ or vae/ folder")
        if (path / "config.json").exists():
            cls_name = read_json(path / "config.json").get("_class_name")
            for kind in KINDS:
                if cls_name == kind.diffusers_class:
                    return kind
            raise CheckpointError(f"{src}: config.json describes {cls_name!r}, not a Sana transformer or DC-AE")
        path = find_weights_in_folder(path)
    sd, metadata = read_weights(path)
    for kind in KINDS:
        if metadata.get("sana_model") == kind.name:
            return kind
        conv = kind.converters
        if conv.detect_layout(strip_prefixes(sd)):
            return kind
    raise CheckpointError(f"{path}: neither a Sana transformer nor a DC-AE checkpoint (keys: {sorted(sd)[:3]})")


def convert(src: str | Path, dst: str | Path, to: str, kind: ModelKind | None = None, config: Any = None) -> Path:
    """Rewrite a checkpoint in another layout without building the model (keys checked strictly on meta)."""
    kind = kind or detect_kind(src, config)
    ckpt = read_checkpoint(src, kind, config)
    sd = _native_state_dict(ckpt, kind)
    cls = kind.model_cls
    with torch.device("meta"):
        check_keys(cls(ckpt.config), sd, ckpt.source)
    return write_checkpoint(sd, ckpt.config, kind, dst, to)
