"""Helpers of the serve tests (imported by them; not a pytest conftest): a fake pipeline, a live uvicorn server in a
thread, the tiny random pipeline folder built once per process.

Run as a script it serves the fake pipeline on a port, for the SIGTERM test:
`python tests/conftest_serve.py PORT [DELAY_PER_STEP_S]`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from sana.pipeline import Sampler


class FakePipeline:
    """The Pipeline interface the server uses, without a model: each image is a flat colour of (prompt, seed).

    `gate` (an Event) blocks every call but the warm-up until set; `step_delay` sleeps at each step; `calls`
    records the prompts and seeds of every call, warm-up included.
    """

    def __init__(self, steps: int = 2, step_delay: float = 0.0, gate: threading.Event | None = None, name="fake"):
        self.default_size, self.steps, self.guidance, self.sampler = 512, steps, 4.5, Sampler.FLOW_DPM_SOLVER
        self.name, self.dtype, self.device = name, torch.float32, torch.device("cpu")
        self.step_delay, self.gate = step_delay, gate
        self.calls: list[tuple[list[str], list[int]]] = []
        self.started = threading.Event()  # set when a call (not the warm-up) begins

    def __call__(self, prompts, *, height, width, steps, generator, callback=None, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append((list(prompts), seeds))
        warm_up = prompts == ["warm-up"]
        if not warm_up:
            self.started.set()
        if self.gate is not None and not warm_up:
            assert self.gate.wait(30), "the test never opened the gate"
        for i in range(steps):
            time.sleep(self.step_delay)
            if callback is not None:
                callback(i, None, None)
        return [Image.new("RGB", (width, height), colour(p, s)) for p, s in zip(prompts, seeds, strict=True)]

    def generated_prompts(self) -> list[str]:
        return [p for prompts, _ in self.calls for p in prompts if p != "warm-up"]


def colour(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a random free port) in a thread; `url` once started."""

    def __init__(self, app, ready_timeout: float = 60.0, wait_healthy: bool = True):
        import uvicorn

        self.app = app
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.ready_timeout, self.wait_healthy = ready_timeout, wait_healthy

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if self.wait_healthy:
            wait_healthy(self.url, deadline - time.monotonic())
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def service(self):
        return self.app.state.service


def wait_healthy(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            last = httpx.get(f"{url}/health", timeout=5)
            if last.status_code == 200:
                return last.json()
        time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout} s: {last and last.text}")


def metric(text: str, name: str) -> float:
    """The value of one sample (name with its labels, as written) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


@functools.cache
def tiny_pipeline_dir() -> Path:
    """The tiny random pipeline folder (tests/tiny.py), built once per process, removed at exit."""
    from tiny import make_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="sana-serve-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_tiny_pipeline(root / "pipe")


def _main(argv: list[str]) -> None:
    from sana.serve.app import create_app
    from sana.serve.server import run

    port = int(argv[0])
    delay = float(argv[1]) if len(argv) > 1 else 0.1
    app = create_app(FakePipeline(steps=2, step_delay=delay), max_batch=2, max_wait_ms=10)
    run(app, "127.0.0.1", port, graceful_timeout_s=30, log_level="warning")


if __name__ == "__main__":
    _main(sys.argv[1:])
