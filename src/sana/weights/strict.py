"""Strict loading: every key consumed, every shape checked, errors that name the key."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sana.errors import CheckpointError
from sana.weights.io import StateDict


def check_keys(model: nn.Module, sd: StateDict, source: str) -> None:
    """Raise CheckpointError unless `sd` has exactly the model's keys with the model's shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
    shapes = [
        f"{k} has shape {tuple(sd[k].shape)}, model expects {shape}"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped: " + "; ".join(shapes[:3]))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def build_and_load(
    factory: Callable[[], nn.Module],
    sd: StateDict,
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a model on the meta device (no memory), check `sd` strictly, then adopt its tensors.

    Tensors are moved/cast once, so a 1.6B model never takes twice its memory.
    """
    with torch.device("meta"):
        model = factory()
    check_keys(model, sd, source)
    converted = {}
    for k, v in sd.items():
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        converted[k] = v.to(device=device or "cpu", dtype=target_dtype)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()
