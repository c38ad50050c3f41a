"""`sana serve`: the subcommand's options and the call to `sana.serve.server.serve`.

Building the parser imports nothing beyond argparse, so `sana --help` works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import sys

from sana.cli_args import add_device_options, dtype_of
from sana.errors import SanaError


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `sana` command's subparsers and return its parser."""
    s = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI Images API, web page, /health, /metrics)",
        description="Serve a model: POST /v1/images/generations (OpenAI Images API compatible, with seed, steps, "
        "guidance and negative_prompt extensions), a web page at /, GET /health and GET /metrics. Compatible "
        "requests are generated together in batches. SIGINT/SIGTERM finish the requests already received, then "
        "exit. Needs the serve extra: pip install 'sana[serve]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--model", default="sana-600m-1024", help="preset name, Hub repo id or local pipeline folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_device_options(s)
    s.add_argument("--max-batch", type=int, default=4, help="most images generated together")
    s.add_argument("--max-wait-ms", type=float, default=20, help="longest wait for compatible requests to batch")
    s.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more are answered 429")
    s.add_argument("--max-images", type=int, default=4, help="largest n (images per request)")
    s.add_argument("--timeout", type=float, default=300, help="seconds before an unanswered request gets 504")
    s.add_argument(
        "--api-key-file",
        default=None,
        help="a file holding the API key clients must send as 'Authorization: Bearer KEY' (default: no key)",
    )
    s.add_argument(
        "--safety",
        choices=("off", "model", "words"),
        default="off",
        help="prompt check: a ShieldGemma classifier, a word list, or none; flagged prompts become 'A red heart.'",
    )
    s.add_argument("--safety-model", default="google/shieldgemma-2b", help="classifier for --safety model")
    s.add_argument("--safety-threshold", type=float, default=0.2, help="P(Yes) above which a prompt is unsafe")
    s.add_argument("--safety-words", default=None, help="for --safety words: a file with one word or phrase a line")
    s.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info", help="uvicorn log"
    )
    s.set_defaults(func=run_serve_command)
    return s


def _read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SanaError(f"cannot read the API key file {path}: {e}") from e
    if not key:
        raise SanaError(f"the API key file {path} is empty")
    return key


def run_serve_command(args: argparse.Namespace) -> int:
    """`sana serve ARGS`: check the options, build the safety checker, serve until stopped."""
    for name in ("max_batch", "queue_size", "max_images"):
        if getattr(args, name) < 1:
            raise SanaError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_wait_ms < 0 or args.timeout <= 0:
        raise SanaError("--max-wait-ms must be >= 0 and --timeout > 0")
    if not 0 <= args.port <= 65535:
        raise SanaError(f"--port must be in 0..65535, got {args.port}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SanaError(f"sana serve needs the serve extra ({e.name} is missing): pip install 'sana[serve]'") from e

    from sana import safety
    from sana.serve.server import serve

    api_key = _read_api_key(args.api_key_file)
    dtype = dtype_of(args.dtype)
    checker = safety.build_checker(
        args.safety,
        model=args.safety_model,
        words=args.safety_words,
        threshold=args.safety_threshold,
        device=args.device,
    )
    sys.stderr.write(f"sana serve: loading {args.model}\n")
    serve(
        args.model,
        args.host,
        args.port,
        device=args.device,
        dtype=dtype,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_images=args.max_images,
        api_key=api_key,
        safety=checker,
        request_timeout_s=args.timeout,
        log_level=args.log_level,
    )
    return 0
