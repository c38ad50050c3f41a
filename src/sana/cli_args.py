"""Command-line options shared by several `sana` subcommands (imports nothing heavy)."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, as every command that loads a pipeline takes them."""
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype (auto: bf16 on GPU, fp16 for fp16-trained models, fp32 on CPU)",
    )


def dtype_of(name: str):
    """The torch dtype named by --dtype, or None for auto."""
    import torch

    return None if name == "auto" else getattr(torch, name)
