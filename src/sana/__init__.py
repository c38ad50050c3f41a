"""sana: a fast, tested PyTorch implementation of the Sana text-to-image system."""

from sana.errors import CheckpointError, ConfigError, SanaError
from sana.pipeline import PIPELINE_PRESETS, Pipeline
from sana.weights.load import convert, load_autoencoder, load_transformer, save_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "PIPELINE_PRESETS",
    "Pipeline",
    "SanaError",
    "convert",
    "load_autoencoder",
    "load_transformer",
    "save_model",
]
