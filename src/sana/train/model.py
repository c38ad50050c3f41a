"""The models of a training run: the transformer to train (reference init, released weights, LoRA) and the
frozen DC-AE and Gemma-2 text encoder around it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from sana import hub
from sana.errors import ConfigError
from sana.models.dcae import DCAE
from sana.models.text_encoder import DEFAULT_CHI, TextEncoder
from sana.models.transformer import SanaTransformer
from sana.train.config import SPRINT_UNSUPPORTED, ModelConfig
from sana.weights.io import write_safetensors
from sana.weights.load import load_autoencoder, load_transformer

# What a released pipeline or model repo needs (configs, safetensors weights, tokenizer files).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]


def resolve_source(source: str) -> Path:
    """A local path as is, or the local snapshot of a Hugging Face repo id (downloaded when not cached)."""
    return hub.resolve(source, allow_patterns=_HUB_PATTERNS)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else the CPU; otherwise the named device (which must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return device


def reference_init_(model: SanaTransformer, generator: torch.Generator | None = None) -> SanaTransformer:
    """Sana's from-scratch initialisation (reference section 1.10): every Linear xavier-uniform with zero bias,
    the patch embedding xavier-uniform on its flattened (C, Cin p p) view, and the timestep embedder, t_block
    and caption projection normal(std 0.02). Modulation tables and norms keep their constructor values."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = model.patch_embed.weight  # (C, Cin, p, p)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=generator)
        nn.init.zeros_(model.patch_embed.bias)
        for linear in (
            model.time_embed.fc1,
            model.time_embed.fc2,
            model.t_block,
            model.caption_proj.fc1,
            model.caption_proj.fc2,
        ):
            nn.init.normal_(linear.weight, std=0.02, generator=generator)
    return model


def build_transformer(cfg: ModelConfig, generator: torch.Generator | None = None) -> SanaTransformer:
    """The transformer to train, in fp32 on the CPU: `init_from`'s weights, or the reference init from
    `generator`; gradient checkpointing and LoRA adapters as configured."""
    if cfg.init_from:
        model = load_transformer(resolve_source(cfg.init_from), config=cfg.transformer_config(), dtype=torch.float32)
        if model.config.guidance_embeds:
            raise ConfigError(f"{cfg.init_from}: {SPRINT_UNSUPPORTED}")
    else:
        arch = cfg.transformer_config()
        if arch is None:
            raise ConfigError("[model] needs `preset`, [model.arch] or `init_from`")
        model = reference_init_(SanaTransformer(arch), generator)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    if cfg.lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, cfg.lora_rank, cfg.lora_alpha or float(cfg.lora_rank), cfg.lora_targets, generator)
    return model.train()


def load_autoencoder_for(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> DCAE:
    """The frozen DC-AE named by `cfg.autoencoder`."""
    if not cfg.autoencoder:
        raise ConfigError("[model] autoencoder is not set")
    ae = load_autoencoder(resolve_source(cfg.autoencoder), device=device, dtype=dtype)
    return ae.eval().requires_grad_(False)


def load_text_encoder_for(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    """The frozen Gemma-2 text encoder named by `cfg.text_encoder`."""
    if not cfg.text_encoder:
        raise ConfigError("[model] text_encoder is not set")
    te = TextEncoder.from_pretrained(cfg.text_encoder, device=device, dtype=dtype)
    te.model.requires_grad_(False)
    return te


def chi_lines(use_chi: bool) -> tuple[str, ...] | None:
    """The Complex Human Instruction given to TextEncoder.encode (None: plain captions)."""
    return tuple(DEFAULT_CHI) if use_chi else None


# ----------------------------------------------------------------------------------------------------------
# LoRA as a weight parametrization: W' = W + (alpha / r) B A, so that `.weight` stays valid for every caller.


class LoRA(nn.Module):
    """W + scale B A (Hu et al. 2021, eq. 3); B starts at zero, so an adapted model starts equal to the base."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype) * self.scale


def add_lora(
    model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], generator: torch.Generator | None = None
) -> list[str]:
    """Add LoRA adapters to every Linear whose name ends with one of `targets`; returns the adapted names."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ConfigError(f"[model] lora_targets {list(targets)} match no Linear layer of the transformer")
    for name in names:
        linear = model.get_submodule(name)
        lora = LoRA(linear.out_features, linear.in_features, rank, alpha, generator)
        parametrize.register_parametrization(linear, "weight", lora.to(linear.weight.device))
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} of every adapted layer."""
    sd = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LoRA):
                    sd[f"{name}.lora_A"] = p.A.detach()
                    sd[f"{name}.lora_B"] = p.B.detach()
    return sd


def lora_adapters(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module: (A (r, in), B (out, r), alpha / r)} of every adapted layer, for `sana.lora.save_lora`."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LoRA):
                    out[name] = (p.A.detach(), p.B.detach(), p.scale)
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA folded into its weight (plain native state-dict keys)."""
    if not lora_state_dict(model):
        return model
    merged = copy.deepcopy(model)
    for module in list(merged.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return merged


def save_lora(model: nn.Module, path: str | Path, rank: int, alpha: float) -> Path:
    """Write the adapters as one safetensors file (metadata: rank, alpha)."""
    write_safetensors(path, lora_state_dict(model), {"sana_lora_rank": str(rank), "sana_lora_alpha": str(alpha)})
    return Path(path)
