"""Sana's models: the linear DiT, the DC-AE autoencoder and the Gemma-2 text encoder."""

from sana.models.dcae import DCAE, DCAE_PRESETS, DCAEConfig
from sana.models.text_encoder import TextEncoder
from sana.models.transformer import TRANSFORMER_PRESETS, SanaTransformer, TransformerConfig

__all__ = [
    "DCAE",
    "DCAE_PRESETS",
    "TRANSFORMER_PRESETS",
    "DCAEConfig",
    "SanaTransformer",
    "TextEncoder",
    "TransformerConfig",
]
