"""Load test of `sana serve`: images/s, latency and batching of the server under concurrent clients.

Starts `python -m sana serve` on 127.0.0.1 (a free port), waits for GET /health, sends warm-up requests, then fires
`--requests` POST /v1/images/generations (response_format b64_json, one image each, the same size / steps /
guidance so that they can share batches) from `--clients` concurrent clients, each with one request in flight.
Records every request's latency and status (200, 429 queue full, or anything else), reads /metrics before and after
the load phase (batch-size histogram, images served, requests by status), prints a table and writes JSON. Exits 1
when a request was lost: neither an image nor a 429, or the server's counts disagree with the clients'.

GPU (one H100), the full-size random-weight 600M pipeline at 1024x1024, 20 steps:

    python bench/make_random_pipeline.py --preset sana-600m-1024 --out /tmp/sana-600m-random
    python bench/serve_load.py --model /tmp/sana-600m-random --size 1024 --steps 20 --requests 200 --clients 32 \\
        --max-batch 4 --max-wait-ms 20 --queue-size 64 --device cuda --out serve_load-b4.json
    python bench/serve_load.py --model /tmp/sana-600m-random --size 1024 --steps 20 --requests 200 --clients 32 \\
        --max-batch 8 --max-wait-ms 50 --queue-size 64 --device cuda --out serve_load-b8.json

CPU smoke run (what tests/test_bench_scripts.py does, with the tiny pipeline of tests/tiny.py):

    python bench/serve_load.py --model TINY_PIPELINE --size 64 --steps 2 --requests 12 --clients 4 --device cpu

Latencies are client-side (send to full answer, PNG encoding and base64 included); images/s counts the images
received over the wall time of the load phase (first send to last answer). The largest batch is read from the
Prometheus histogram, so it is the upper bound of its bucket (1, 2, 4, 8, ...), capped at --max-batch.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WARMUP_SEEDS = 1_000_000  # warm-up request i uses this seed + i; load request i uses seed i
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


@dataclass
class Result:
    """One request of the load phase, as the client saw it."""

    index: int
    status: int  # HTTP status; 0 when no answer came (connection error, timeout)
    latency_s: float
    images: int = 0
    error: str = ""


# ----------------------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log_file) -> subprocess.Popen:
    """`python -m sana serve` with the load test's settings, its output to log_file."""
    command = [sys.executable, "-m", "sana", "serve", "--model", args.model, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    command += ["--queue-size", str(args.queue_size), "--timeout", str(args.request_timeout)]
    command += ["--dtype", args.dtype, "--log-level", "warning"]
    if args.device:
        command += ["--device", args.device]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> dict:
    """The /health JSON once it answers 200; RuntimeError when the process exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            answer = httpx.get(f"{url}/health", timeout=5)
            if answer.status_code == 200:
                return answer.json()
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.TransportError as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout_s:g} s (last /health: {last})")


def stop_server(process: subprocess.Popen, timeout_s: float = 120) -> int:
    """SIGTERM (the server finishes what it received), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# ----------------------------------------------------------------------------------------------------------
# Prometheus text


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of the exposition text: 'name{labels}' (as written) -> value."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and not line.startswith("#"):
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def batch_stats(before: dict[str, float], after: dict[str, float], max_batch: int) -> dict:
    """Batches generated between two scrapes: count, images, mean size, the largest size's bucket bound, the
    histogram of the difference (bucket upper bound -> batches)."""
    count = after.get("sana_batch_size_count", 0) - before.get("sana_batch_size_count", 0)
    total = after.get("sana_batch_size_sum", 0) - before.get("sana_batch_size_sum", 0)
    cumulative = []
    for key, value in after.items():
        match = re.fullmatch(r'sana_batch_size_bucket\{le="([^"]+)"\}', key)
        if match:
            cumulative.append((float(match.group(1)), value - before.get(key, 0)))
    cumulative.sort()
    histogram, below, largest = {}, 0.0, 0.0
    for bound, n in cumulative:
        if n > below:
            histogram[_bound(bound)] = int(n - below)
            largest = bound
        below = n
    return {
        "batches": int(count),
        "images_in_batches": int(total),
        "batch_size_mean": total / count if count else 0.0,
        "batch_size_max": min(largest, max_batch) if count else 0,
        "batch_size_histogram": histogram,
    }


def _bound(x: float) -> str:
    return "+Inf" if math.isinf(x) else str(int(x))


def status_count(samples: dict[str, float], status: int) -> float:
    return samples.get(f'sana_requests_total{{status="{status}"}}', 0.0)


# ----------------------------------------------------------------------------------------------------------
# The clients


def request_body(args: argparse.Namespace, index: int) -> dict:
    body = {
        "prompt": f"a photo of object number {index} on a table, studio lighting",
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "seed": index,
        "response_format": "b64_json",
    }
    if args.guidance is not None:
        body["guidance"] = args.guidance
    return body


def send(client: httpx.Client, url: str, args: argparse.Namespace, index: int) -> Result:
    """One request; a 200 counts only with one PNG of the asked size in it."""
    from PIL import Image

    start = time.perf_counter()
    try:
        answer = client.post(f"{url}/v1/images/generations", json=request_body(args, index))
    except httpx.HTTPError as e:
        return Result(index, 0, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    if answer.status_code != 200:
        return Result(index, answer.status_code, latency, error=answer.text[:200])
    try:
        data = answer.json()["data"]
        pngs = [base64.b64decode(item["b64_json"]) for item in data]
        sizes = [Image.open(io.BytesIO(png)).size for png in pngs]  # reads the header only
    except (ValueError, KeyError, TypeError, OSError) as e:
        return Result(index, 200, latency, error=f"unreadable answer: {type(e).__name__}: {e}")
    if len(pngs) != 1 or not pngs[0].startswith(PNG_SIGNATURE) or sizes[0] != (args.size, args.size):
        return Result(index, 200, latency, error=f"expected one {args.size}x{args.size} PNG, got sizes {sizes}")
    return Result(index, 200, latency, images=1)


def run_clients(url: str, args: argparse.Namespace, indices: list[int], clients: int) -> tuple[list[Result], float]:
    """Send the requests `indices` from `clients` threads, each with one request in flight; (results, wall s)."""
    pending = list(reversed(indices))
    lock = threading.Lock()
    results: list[Result] = []

    def client_loop() -> None:
        with httpx.Client(timeout=httpx.Timeout(args.request_timeout + 60, connect=30)) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    index = pending.pop()
                result = send(client, url, args, index)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(min(clients, len(indices)))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r.index), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------------------
# Report


def environment(device: str | None) -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
    }
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        index = torch.device(device).index if device and ":" in device else 0
        env["gpu"] = torch.cuda.get_device_name(index or 0)
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def print_table(report: dict) -> None:
    r, s = report["results"], report["settings"]
    env = report["env"]
    print(f"sana serve load: {env['gpu'] or 'CPU'}, torch {env['torch']}, {env['date']}")
    print(
        f"  model {s['model']}  {s['size']}x{s['size']}  {s['steps']} steps  max_batch {s['max_batch']}  "
        f"max_wait_ms {s['max_wait_ms']:g}  queue {s['queue_size']}  clients {s['clients']}"
    )
    rows = [
        ("requests", f"{s['requests']}"),
        ("200 / 429 / other", f"{r['ok']} / {r['rejected_429']} / {r['other']}"),
        ("images/s", f"{r['images_per_s']:.3f}"),
        ("requests/s (200)", f"{r['requests_per_s']:.3f}"),
        (
            "latency p50 / p95 / max (s)",
            f"{r['latency_p50_s']:.3f} / {r['latency_p95_s']:.3f} / {r['latency_max_s']:.3f}",
        ),
        ("batch size mean / max", f"{r['batch_size_mean']:.2f} / {r['batch_size_max']:g}"),
        ("batches", f"{r['batches']}  {r['batch_size_histogram']}"),
        ("load wall time (s)", f"{r['wall_s']:.2f}"),
        ("lost requests", f"{r['lost']}"),
    ]
    for name, value in rows:
        print(f"  {name:30s} {value}")


def tally(
    results: list[Result],
    requests: int,
    wall: float,
    before: dict[str, float],
    after: dict[str, float] | None,
    max_batch: int,
) -> tuple[dict, list[str]]:
    """The load phase's numbers from the clients' results and the /metrics scrapes around it, and the problems:
    requests with neither an image nor a 429, requests that never returned, server counts unlike the clients'."""
    after = after if after is not None else before
    ok, rejected, other = [], [], []
    for r in results:
        (ok if r.status == 200 and not r.error else rejected if r.status == 429 else other).append(r)
    images = sum(r.images for r in ok)
    served = after.get("sana_images_served_total", 0) - before.get("sana_images_served_total", 0)
    server_ok = status_count(after, 200) - status_count(before, 200)
    server_429 = status_count(after, 429) - status_count(before, 429)
    latencies = [r.latency_s for r in ok]
    problems = []
    if len(results) != requests:
        problems.append(f"{requests - len(results)} request(s) never returned")
    if other:
        problems.append(f"{len(other)} request(s) got neither an image nor a 429: {other[0].status} {other[0].error}")
    if (server_ok, server_429, served) != (len(ok), len(rejected), images):
        problems.append(
            f"server counts 200={server_ok:g} 429={server_429:g} images={served:g} differ from the clients' "
            f"200={len(ok)} 429={len(rejected)} images={images}"
        )
    summary = {
        "ok": len(ok),
        "rejected_429": len(rejected),
        "other": len(other),
        "lost": len(other) + requests - len(results),
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies, default=0.0),
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else 0.0,
        **batch_stats(before, after, max_batch),
        "server_images_served": served,
        "server_requests_200": server_ok,
        "server_requests_429": server_429,
    }
    return summary, problems


def load_test(args: argparse.Namespace) -> dict:
    """Start the server, warm up, run the load phase, stop the server; the report (see the module doc)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".server.log")
    with open(log_path, "w") as log_file:
        process = start_server(args, port, log_file)
        try:
            health = wait_ready(url, process, args.ready_timeout)
            # Warm-up: one request, then one concurrent round at the load's settings (not counted).
            first = WARMUP_SEEDS
            warm = run_clients(url, args, [first], 1)[0]
            warm += run_clients(url, args, list(range(first + 1, first + 1 + args.warmup)), args.warmup)[0]
            bad = [r for r in warm if r.status != 200 or r.error]
            if bad:
                raise RuntimeError(f"warm-up request failed: {bad[0].status} {bad[0].error}")
            before = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
            results, wall = run_clients(url, args, list(range(args.requests)), args.clients)
            try:
                after = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
            except httpx.HTTPError:
                after = None
        finally:
            code = stop_server(process)
    results_summary, problems = tally(results, args.requests, wall, before, after, args.max_batch)
    if after is None:
        problems.append("could not read /metrics after the load phase (did the server die? see its log)")
    return {
        "settings": {**vars(args), "port": port},
        "env": environment(args.device),
        "health": health,
        "results": {**results_summary, "server_exit_code": code},
        "problems": problems,
        "requests": [asdict(r) for r in results],
        "server_log": str(log_path),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="sana-600m-1024", help="pipeline folder, Hub repo id or preset (default: %(default)s)"
    )
    ap.add_argument("--size", type=int, default=1024, help="image side, a multiple of 32 (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps per image (default: %(default)s)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--requests", type=int, default=200, help="requests of the load phase (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default: %(default)s)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="concurrent warm-up requests after the first (default: --max-batch)"
    )
    ap.add_argument("--max-batch", type=int, default=4, help="server: most images per batch (default: %(default)s)")
    ap.add_argument("--max-wait-ms", type=float, default=20, help="server: batching wait (default: %(default)s)")
    ap.add_argument(
        "--queue-size", type=int, default=64, help="server: waiting requests before 429 (default: %(default)s)"
    )
    ap.add_argument(
        "--request-timeout", type=float, default=1800, help="server: seconds before 504 (default: %(default)s)"
    )
    ap.add_argument(
        "--ready-timeout", type=float, default=1200, help="seconds to wait for /health (default: %(default)s)"
    )
    ap.add_argument("--device", default=None, help="server device: cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="server weights dtype (default: %(default)s: bf16 on GPU)")
    ap.add_argument("--out", default="serve_load.json", help="JSON report (default: %(default)s)")
    args = ap.parse_args(argv)
    args.warmup = args.max_batch if args.warmup is None else args.warmup
    if args.requests < 1 or args.clients < 1 or args.warmup < 1 or args.size < 32 or args.size % 32:
        ap.error("--requests, --clients and --warmup must be >= 1, --size a multiple of 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = load_test(args)
    except (RuntimeError, httpx.HTTPError) as e:
        log = Path(args.out).with_suffix(".server.log")
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        print(f"{tail}\nserve_load: error: {e} (server log: {log})", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {args.out}")
    for problem in report["problems"]:
        print(f"serve_load: LOST: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
