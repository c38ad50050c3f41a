"""Sana's models: the linear DiT, the DC-AE autoencoder and the Gemma-2 text encoder."""

from sana.models.transformer import TRANSFORMER_PRESETS, SanaTransformer, TransformerConfig

__all__ = ["TRANSFORMER_PRESETS", "SanaTransformer", "TransformerConfig"]
