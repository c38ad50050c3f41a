"""Tiny random Sana pipelines in the diffusers layout, built and saved locally (no Hub): shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import randomize_
from test_text_encoder import _gemma_config, _train_tokenizer

TINY_TRANSFORMER = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=4,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=32,
    caption_channels=32,
    sample_size=16,
    patch_size=1,
)
TINY_VAE = dict(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=[
        "ResBlock",
        "ResBlock",
        "ResBlock",
        "EfficientViTBlock",
        "EfficientViTBlock",
        "EfficientViTBlock",
    ],
    decoder_block_types=[
        "ResBlock",
        "ResBlock",
        "ResBlock",
        "EfficientViTBlock",
        "EfficientViTBlock",
        "EfficientViTBlock",
    ],
    encoder_block_out_channels=[8, 8, 16, 16, 16, 16],
    decoder_block_out_channels=[8, 8, 16, 16, 16, 16],
    encoder_layers_per_block=[1, 1, 1, 1, 1, 1],
    decoder_layers_per_block=[1, 1, 1, 1, 1, 1],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)


def make_tiny_pipeline(root: Path, sprint: bool = False, seed: int = 0) -> Path:
    """Save a random tiny SanaPipeline (or SanaSprintPipeline) folder at root and return it."""
    import diffusers
    from transformers import Gemma2Model

    torch.manual_seed(seed)
    tokenizer = _train_tokenizer()
    text_encoder = Gemma2Model(_gemma_config(len(tokenizer))).eval()
    extra = dict(qk_norm="rms_norm_across_heads", guidance_embeds=True) if sprint else {}
    transformer = randomize_(diffusers.SanaTransformer2DModel(**TINY_TRANSFORMER, **extra), std=0.05, seed=seed)
    vae = diffusers.AutoencoderDC(**TINY_VAE)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if sprint:
        scheduler = diffusers.SCMScheduler(sigma_data=0.5)
        pipe = diffusers.SanaSprintPipeline(tokenizer, text_encoder, vae, transformer, scheduler)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
        )
        pipe = diffusers.SanaPipeline(tokenizer, text_encoder, vae, transformer, scheduler)
    pipe.save_pretrained(root)
    return root
