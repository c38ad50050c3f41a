"""A diffusers-layout pipeline folder from separately trained parts: `sana assemble`.

    OUT/model_index.json                  SanaPipeline, as diffusers writes it
    OUT/transformer/                      SanaTransformer2DModel (config.json + diffusion_pytorch_model.safetensors)
    OUT/vae/                              AutoencoderDC
    OUT/text_encoder/, OUT/tokenizer/     the Gemma-2 decoder and its tokenizer (transformers' layout)
    OUT/scheduler/scheduler_config.json   DPMSolverMultistepScheduler with flow sigmas and the flow shift

Weights are stored in `dtype` (float16 halves the folder; the pipeline casts them to its own dtype on load). The
folder is written beside OUT and renamed into place, so an interrupted run leaves no half-written pipeline.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from sana.errors import SanaError
from sana.models.text_encoder import TextEncoder
from sana.weights.load import load_autoencoder, load_transformer, save_model

SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "midpoint",
    "use_flow_sigmas": True,
}


def _find(path: Path, name: str) -> Path:
    """`path` itself, or its `name` subfolder (a training run's final/ folder holds e.g. vae/)."""
    return path / name if (path / name).is_dir() else path


def assemble_pipeline(
    transformer: str | Path,
    autoencoder: str | Path,
    text_encoder: str | Path,
    out: str | Path,
    flow_shift: float = 3.0,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write the pipeline folder `out` from a transformer checkpoint (any layout `load_transformer` reads), a DC-AE
    (any layout `load_autoencoder` reads) and a text-encoder folder (tokenizer/ + text_encoder/, or a Gemma model
    folder). Each part is loaded (and so checked) before anything is written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SanaError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    if flow_shift <= 0:
        raise SanaError(f"flow_shift must be > 0, got {flow_shift}")
    model = load_transformer(_find(Path(transformer), "transformer"), dtype=dtype)
    ae = load_autoencoder(_find(Path(autoencoder), "vae"), dtype=dtype)
    te = TextEncoder.from_pretrained(text_encoder, dtype=dtype)
    if te.hidden_size != model.config.caption_channels:
        raise SanaError(
            f"the text encoder's width {te.hidden_size} differs from the transformer's caption_channels "
            f"{model.config.caption_channels}"
        )
    if ae.config.latent_channels != model.config.in_channels:
        raise SanaError(
            f"the DC-AE has {ae.config.latent_channels} latent channels, "
            f"the transformer takes {model.config.in_channels}"
        )
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(model, tmp / "transformer", layout="diffusers")
        save_model(ae, tmp / "vae", layout="diffusers")
        te.tokenizer.save_pretrained(tmp / "tokenizer")
        te.model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        scheduler = {**SCHEDULER_CONFIG, "flow_shift": float(flow_shift)}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = {
            "_class_name": "SanaPipeline",
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", type(te.model).__name__],
            "tokenizer": ["transformers", type(te.tokenizer).__name__],
            "transformer": ["diffusers", "SanaTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderDC"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
