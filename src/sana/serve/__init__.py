"""Serving Sana over HTTP: an OpenAI-compatible image API with a batching queue, /health, /metrics, a web page.

`create_app(pipeline)` builds the FastAPI app; `serve(model, host, port)` loads a model and runs it with uvicorn.
FastAPI and uvicorn are the `serve` extra: importing this package does not import them (the command line reads
`sana.serve.cli` to build its parser without them); `create_app` and `serve` do.
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    if name == "create_app":
        from sana.serve.app import create_app

        return create_app
    if name == "serve":
        from sana.serve.server import serve

        return serve
    raise AttributeError(f"module 'sana.serve' has no attribute {name!r}")
