"""LoRA checkpoints in the PEFT / diffusers layout: read, merge into the native transformer, restore, write.

A file holds `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r) per adapted diffusers module
(1x1 convs store (r, in, 1, 1) and (out, r, 1, 1)), under a `transformer.` and/or `base_model.model.` prefix.
Merging is W += scale * (alpha / r) B A (Hu et al. 2021, eq. 3). Our transformer fuses to_q/to_k/to_v into
`attn.qkv` and attn2's to_k/to_v into `cross_attn.kv`: an adapter on one of them updates its row block.

Supported: every layer whose native module is an nn.Linear (diffusers Linear layers and the 1x1 convs
ff.conv_inverted / ff.conv_point). Not supported (CheckpointError): patch_embed, ff.conv_depth, norms, DoRA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from sana.errors import CheckpointError
from sana.models.transformer import SanaTransformer, TransformerConfig
from sana.weights.io import StateDict, read_safetensors, write_json, write_safetensors
from sana.weights.transformer import _table

LORA_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_PREFIXES = ("base_model.model.", "transformer.")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")


@dataclasses.dataclass(frozen=True)
class LoraUpdate:
    """One adapter as an update of rows [start, start + B.shape[0]) of a native Linear weight."""

    module: str  # native Linear, e.g. "blocks.0.attn.qkv"
    start: int
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (rows, r)
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    source: str  # the diffusers module it came from, for messages


def diffusers_modules(cfg: TransformerConfig) -> dict[str, tuple[str, int, int]]:
    """{diffusers module: (native module, block index, number of blocks)} for every weight of the layout."""
    out = {}
    for native, srcs, _ in _table(cfg, "diffusers"):
        if native.endswith(".weight"):
            for i, src in enumerate(srcs):
                out[src.removesuffix(".weight")] = (native.removesuffix(".weight"), i, len(srcs))
    return out


def resolve_lora_file(path: str | Path) -> Path:
    """A .safetensors file as is, or the LoRA file of a folder (diffusers' or PEFT's name)."""
    path = Path(path)
    if path.is_dir():
        for name in LORA_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no LoRA file (expected one of {', '.join(LORA_NAMES)})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    return path


def read_lora(path: str | Path, model: SanaTransformer) -> list[LoraUpdate]:
    """Read a PEFT / diffusers LoRA file (and the adapter_config.json beside it, when present) for `model`."""
    file = resolve_lora_file(path)
    sd, _ = read_safetensors(file)
    config = {}
    if (file.parent / "adapter_config.json").is_file():
        try:
            config = json.loads((file.parent / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file.parent / 'adapter_config.json'}: cannot read: {e}") from e
    return lora_updates(sd, model, config, source=str(file))


def lora_updates(
    sd: StateDict, model: SanaTransformer, config: dict | None = None, source: str = ""
) -> list[LoraUpdate]:
    """Map a LoRA state dict in diffusers module names onto `model`'s native Linear layers (strict)."""
    at = f"{source}: " if source else ""
    config = config or {}
    if config.get("use_dora"):
        raise CheckpointError(f"{at}DoRA adapters (use_dora) are not supported")
    table = diffusers_modules(model.config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, t in sd.items():
        name = _strip(key)
        if (m := _KEY.match(name)) and m["module"] in table and table[m["module"]][0] in linears:
            pairs.setdefault(m["module"], {})[m["ab"]] = (key, t)
        elif (m := _ALPHA.match(name)) and m["module"] in table:
            alphas[m["module"]] = float(t)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{at}{len(unknown)} key(s) that map to no Linear or 1x1 conv layer of the transformer: "
            + ", ".join(sorted(unknown)[:5])
        )
    updates = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            (have,) = ab
            raise CheckpointError(f"{at}{ab[have][0]} has no lora_{'B' if have == 'A' else 'A'} beside it")
        (key_a, A), (key_b, B) = ab["A"], ab["B"]
        A, B = _matrix(A, key_a, at), _matrix(B, key_b, at)
        native, index, count = table[module]
        weight = linears[native].weight
        r = A.shape[0]
        if A.shape[1] != weight.shape[1] or B.shape != (weight.shape[0] // count, r):
            raise CheckpointError(
                f"{at}{key_a} {tuple(A.shape)} / {key_b} {tuple(B.shape)} do not fit {module} "
                f"(in {weight.shape[1]}, out {weight.shape[0] // count})"
            )
        alpha = alphas.get(module, _alpha(config, module, r))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates.append(LoraUpdate(native, index * B.shape[0], A, B, scaling, module))
    return updates


def merge_lora(
    model: nn.Module, updates: list[LoraUpdate], scale: float = 1.0, originals: dict[str, torch.Tensor] | None = None
) -> None:
    """W[rows] += scale * scaling * B A, in place (CUDA graphs see it); the first time a weight is touched,
    a copy of it goes to `originals` (for `restore_weights`)."""
    with torch.no_grad():
        for u in updates:
            weight = model.get_submodule(u.module).weight
            if originals is not None and u.module not in originals:
                originals[u.module] = weight.detach().clone()
            rows = weight[u.start : u.start + u.B.shape[0]]
            delta = (u.B.float() @ u.A.float()) * (scale * u.scaling)  # (rows, in)
            rows.copy_((rows.float() + delta.to(rows.device)).to(rows.dtype))


def restore_weights(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back the weights `merge_lora` saved, exactly, and empty `originals`."""
    with torch.no_grad():
        for module, weight in originals.items():
            model.get_submodule(module).weight.copy_(weight)
    originals.clear()


def to_diffusers_lora(
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]], cfg: TransformerConfig
) -> StateDict:
    """{native module: (A (r, in), B (out, r), alpha / r)} -> diffusers keys, with alpha / r folded into B (so
    the file loads right with diffusers' default alpha = r); fused layers are split into to_q / to_k / to_v."""
    by_native: dict[str, list[tuple[str, int, int]]] = {}
    for module, (native, index, count) in diffusers_modules(cfg).items():
        by_native.setdefault(native, []).append((module, index, count))
    conv1x1 = {srcs[0].removesuffix(".weight") for _, srcs, op in _table(cfg, "diffusers") if op == "conv1x1"}
    out = {}
    for native, (A, B, scaling) in adapters.items():
        if native not in by_native:
            raise CheckpointError(f"LoRA on {native}: no diffusers module to export it to")
        for module, index, count in by_native[native]:
            a, b = A.detach(), (B.detach() * scaling).chunk(count, dim=0)[index]
            if module in conv1x1:
                a, b = a[:, :, None, None], b[:, :, None, None]
            out[f"transformer.{module}.lora_A.weight"] = a.clone()  # to_q, to_k, to_v share A: one copy each
            out[f"transformer.{module}.lora_B.weight"] = b.clone()
    return out


def save_lora(
    folder: str | Path, adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]], cfg: TransformerConfig
) -> Path:
    """Write folder/pytorch_lora_weights.safetensors (diffusers) and an adapter_config.json; returns the file."""
    sd = to_diffusers_lora(adapters, cfg)
    if not sd:
        raise ValueError("no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_NAMES[0]
    write_safetensors(path, sd, {"format": "pt"})
    ranks = {A.shape[0] for A, _, _ in adapters.values()}
    if len(ranks) != 1:
        raise ValueError(f"expected adapters of one rank, got ranks {sorted(ranks)}")
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in sd})
    rank = ranks.pop()  # alpha / r is folded into B, so lora_alpha = r
    write_json(
        folder / "adapter_config.json", {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets}
    )
    return path


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _matrix(t: torch.Tensor, key: str, at: str) -> torch.Tensor:
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    if t.ndim != 2:
        raise CheckpointError(f"{at}{key} has shape {tuple(t.shape)}, expected a matrix or a 1x1 conv weight")
    return t


def _alpha(config: dict, module: str, r: int) -> float:
    """PEFT's alpha for `module`: alpha_pattern (name or suffix match), else lora_alpha, else r (diffusers)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", r))
