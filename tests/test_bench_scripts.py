"""The GPU benchmark scripts of bench/ run end to end on the CPU at tiny size: `serve_load.py` against a real
`sana serve` process with the tiny pipeline, `train_throughput.py` in its throughput mode and in its FSDP2 (2 gloo
processes) against one process mode; plus the load test's bookkeeping on made-up results."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest_serve import tiny_pipeline_dir
from sana.dataclass_io import to_dict
from sana.train.cache import CachedDataset
from sana.train.checkpoint import load_checkpoint
from sana.train.config import Strategy, load_config
from train_tiny import TINY_ARCH

BENCH = Path(__file__).parent.parent / "bench"
# One thread a process: the scripts start several processes on few cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(script: str, *args, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCH / script), *map(str, args)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------
# bench/serve_load.py


def test_serve_load_tiny(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    out = tmp_path / "serve_load.json"
    args = ["--model", tiny_pipeline_dir(), "--size", 64, "--steps", 2, "--requests", 12, "--clients", 4]
    args += ["--max-batch", 4, "--max-wait-ms", 50, "--queue-size", 16, "--device", "cpu", "--out", out]
    done = _run("serve_load.py", *args, timeout=180)
    report = json.loads(out.read_text())
    r = report["results"]
    # The queue holds every client's request: all 12 got an image, the server counted the same, none was lost.
    assert (r["ok"], r["rejected_429"], r["other"], r["lost"], report["problems"]) == (12, 0, 0, 0, [])
    assert r["images"] == r["server_images_served"] == r["server_requests_200"] == 12
    assert sorted(x["index"] for x in report["requests"]) == list(range(12))
    assert all(x["status"] == 200 and x["images"] == 1 for x in report["requests"])
    assert r["images_per_s"] > 0 and r["wall_s"] > 0
    assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_max_s"]
    # The warm-up is not in the batch histogram's difference: the load's 12 images in batches of 1 to 4.
    assert r["images_in_batches"] == 12 and 1 <= r["batch_size_mean"] <= r["batch_size_max"] <= 4
    assert sum(r["batch_size_histogram"].values()) == r["batches"] >= 3
    assert report["env"]["torch"] and report["env"]["date"] and report["env"]["gpu"] is None
    assert "images/s" in done.stdout and "lost requests" in done.stdout


def test_serve_load_bookkeeping_reports_lost_requests_and_batch_sizes():
    serve_load = _module("serve_load")
    Result = serve_load.Result
    before = serve_load.parse_metrics(
        '# TYPE sana_batch_size histogram\nsana_batch_size_bucket{le="1"} 1\nsana_batch_size_bucket{le="2"} 1\n'
        'sana_batch_size_bucket{le="4"} 1\nsana_batch_size_bucket{le="+Inf"} 1\nsana_batch_size_sum 1\n'
        'sana_batch_size_count 1\nsana_images_served_total 1\nsana_requests_total{status="200"} 1\n'
    )
    after = serve_load.parse_metrics(
        'sana_batch_size_bucket{le="1"} 2\nsana_batch_size_bucket{le="2"} 3\nsana_batch_size_bucket{le="4"} 4\n'
        'sana_batch_size_bucket{le="+Inf"} 4\nsana_batch_size_sum 8\nsana_batch_size_count 4\n'
        'sana_images_served_total 8\nsana_requests_total{status="200"} 8\nsana_requests_total{status="429"} 2\n'
    )
    # 7 images in batches of 1, 2 and 4 (sizes 1 + 2 + 4 = 7), two 429s, one request that got a 500.
    results = [Result(i, 200, 1.0 + i, images=1) for i in range(7)]
    results += [Result(7, 429, 0.01), Result(8, 429, 0.01), Result(9, 500, 0.5, error="boom")]
    summary, problems = serve_load.tally(results, 10, 5.0, before, after, max_batch=4)
    assert (summary["ok"], summary["rejected_429"], summary["other"], summary["lost"]) == (7, 2, 1, 1)
    assert summary["images_per_s"] == pytest.approx(7 / 5.0)
    assert summary["latency_p50_s"] == pytest.approx(4.0) and summary["latency_max_s"] == 7.0
    assert (summary["batches"], summary["images_in_batches"], summary["batch_size_max"]) == (3, 7, 4)
    assert summary["batch_size_histogram"] == {"1": 1, "2": 1, "4": 1}
    assert len(problems) == 1 and "neither an image nor a 429: 500 boom" in problems[0]
    # Without the 500: no problem. A request that never returned, or a count the server disagrees with, is one.
    assert serve_load.tally(results[:9], 9, 5.0, before, after, 4)[1] == []
    assert "1 request(s) never returned" in serve_load.tally(results[:9], 10, 5.0, before, after, 4)[1][0]
    assert "differ from the clients'" in serve_load.tally(results[:8], 8, 5.0, before, after, 4)[1][0]


# ----------------------------------------------------------------------------------------------------------
# bench/train_throughput.py


@pytest.fixture(scope="module")
def train_args(tmp_path_factory):
    """Options shared by both modes (one work folder: the second run reuses the images and the cache)."""
    root = tmp_path_factory.mktemp("bench_train")
    arch = root / "arch.json"
    arch.write_text(json.dumps(to_dict(TINY_ARCH)))
    args = ["--pipeline", tiny_pipeline_dir(), "--arch-json", arch, "--resolution", 64, "--images", 8]
    return root, [*args, "--device", "cpu", "--workdir", root / "work"]


def test_train_throughput_tiny(train_args):
    root, common = train_args
    out = root / "throughput.json"
    done = _run("train_throughput.py", *common, "--batch", 2, "--steps", 4, "--warmup", 1, "--out", out, timeout=180)
    report = json.loads(out.read_text())
    t = report["throughput"]
    assert t["samples_per_s"] > 0 and t["timed_steps"] == 3 and len(t["step_ms"]) == 3 and len(t["losses"]) == 4
    assert t["samples_per_s"] == pytest.approx(2 * 1000 / t["step_ms_mean"])
    assert all(math.isfinite(x) for x in t["losses"])
    # MFU = 3 x forward FLOPs x samples/s / peak (989 TFLOP/s by default); no GPU: no measured peak, no memory.
    assert t["forward_gflops_per_sample"] > 0 and t["peak_tflops_spec"] == 989
    expected = 3 * t["forward_gflops_per_sample"] * 1e9 * t["samples_per_s"] / 989e12
    assert t["mfu_vs_spec"] == pytest.approx(expected)
    assert t["matmul_tflops_measured"] is None and t["peak_mem_gib"] is None
    assert report["env"]["torch"] and report["env"]["date"] and report["settings"]["optimizer"] == "came"
    # Trained from a real `sana cache` folder of the 8 images: latents 64 / 32 = 2 a side, 8 channels.
    cache = CachedDataset(report["cache"])
    assert len(cache) == 8 and cache[(0, 0)]["latent"].shape == (8, 2, 2)
    assert "samples/s" in done.stdout
    assert not (root / "work" / "run-throughput" / "checkpoints").exists()  # removed without --keep-checkpoints


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp_compare_tiny(train_args):
    root, common = train_args
    out = root / "compare.json"
    args = [*common, "--fsdp-compare", "--batch", 4, "--steps", 3, "--warmup", 1, "--keep-checkpoints", "--out", out]
    _run("train_throughput.py", *args, timeout=300)
    c = json.loads(out.read_text())["fsdp_compare"]
    one, two = c["one_process"], c["fsdp2"]
    assert (c["global_batch"], c["processes"], c["micro_batch"]) == (4, 2, 2)
    assert len(one["losses"]) == len(two["losses"]) == 3 and one["losses"][0] != one["losses"][2]
    assert c["max_rel_loss_diff"] < 1e-4  # fp32: the same updates up to rounding
    assert one["samples_per_s"] > 0 and two["samples_per_s"] > 0
    # The config written for it, and proof that FSDP2 ran on 2 processes and the reference on one.
    cfg = load_config(c["config"])
    assert cfg.distributed.strategy is Strategy.FSDP2 and cfg.data.batch_size == 2 and cfg.optim.grad_accum == 1
    work = root / "work"
    assert load_checkpoint(work / "run-fsdp2" / "checkpoints" / "step-00000003").info["world_size"] == 2
    assert load_checkpoint(work / "run-one" / "checkpoints" / "step-00000003").info["world_size"] == 1
