"""`serve`: load a model, then run the app with uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from sana.safety import SafetyChecker


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_batch: int = 4,
    max_wait_ms: float = 20,
    queue_size: int = 64,
    max_images: int = 4,
    api_key: str | None = None,
    safety: SafetyChecker | None = None,
    request_timeout_s: float = 300,
    graceful_timeout_s: float | None = None,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Load `model` (preset, Hub repo id or local folder), then serve it on host:port (or on `sock`).

    Loading happens before the port opens, so a bad model name is a `SanaError` here, not a server that never
    gets ready; the warm-up generation runs after (GET /health answers 503 until it is done).

    Shutdown policy (SIGINT / SIGTERM): the listening socket closes at once; every request already received,
    queued or running, is generated and answered; then the worker stops and the function returns. Requests
    still unanswered after `graceful_timeout_s` (default: `request_timeout_s`) are cancelled. A second signal
    exits at once.
    """
    from sana.pipeline import Pipeline
    from sana.serve.app import create_app

    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, progress=False)
    app = create_app(
        pipe,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_images=max_images,
        api_key=api_key,
        safety=safety,
        request_timeout_s=request_timeout_s,
    )
    run(app, host, port, graceful_timeout_s=graceful_timeout_s or request_timeout_s, log_level=log_level, sock=sock)


def run(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    graceful_timeout_s: float = 300,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Run an app from `create_app` with uvicorn in this thread (signals handled in the main thread)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(graceful_timeout_s)),
    )
    uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
