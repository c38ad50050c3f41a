"""Training throughput of a preset transformer from cached latents: samples/s, peak GPU memory, MFU; and FSDP2 on 2
GPUs against one process with the same global batch.

What it does, in WORKDIR (reused by later runs: existing images, caches and pipelines are kept):

1. the pipeline: `--pipeline DIR` (a diffusers folder with vae/, tokenizer/, text_encoder/), or a random-weight one
   made by bench/make_random_pipeline.py for `--preset` in WORKDIR/pipeline-PRESET;
2. `--images` random PNGs at `--resolution`, each with a caption NAME.txt beside it (the image-folder format);
3. the `sana cache` of them (`build_cache_from_config`: the pipeline's DC-AE and Gemma-2 text encoder);
4. throughput mode: `sana.train.loop.train` in this process from `data.source = "cache"` (bf16 autocast on CUDA,
   CAME, EMA on, no periodic checkpoints, no export) for `--steps` updates of `--batch` samples; samples/s is
   timed (torch.cuda.synchronize) from the end of update `--warmup` to the end of the last one.
   MFU = 3 x forward FLOPs per sample (`sana.bench.transformer_flops`, backward = 2 forwards; the recomputation
   of gradient checkpointing is not counted) x samples/s / peak, for two peaks: `--peak-tflops` (default 989,
   the H100 SXM dense BF16 Tensor Core rate of NVIDIA's H100 datasheet) and the dense bf16 matmul rate measured
   on this GPU (`sana.bench.matmul_tflops`).
5. `--fsdp-compare` mode instead: writes WORKDIR/fsdp_compare.toml (global batch G = `--batch`: 2 processes x
   G / 2, grad_accum 1, strategy fsdp2) and runs it for `--steps` updates (a) in one process, `python -m sana
   train` with `optim.grad_accum=2 distributed.strategy=none`, and (b) under `torchrun --standalone
   --nproc-per-node 2 -m sana train ... --set distributed.strategy=fsdp2`: the same batches, noise and seed, so
   the per-step losses must agree up to rounding. Reports both loss curves, their max relative difference, and
   the samples/s of each (from log.jsonl, steps after `--warmup`).

GPU commands (one H100; the pipeline may be shared with bench/serve_load.py):

    python bench/make_random_pipeline.py --preset sana-600m-1024 --out /tmp/sana-600m-random
    python bench/train_throughput.py --pipeline /tmp/sana-600m-random --preset sana-600m-1024 --resolution 1024 \\
        --batch 16 --steps 30 --warmup 5 --workdir /tmp/bench-train --out /tmp/bench-train/throughput-b16.json
    python bench/train_throughput.py --pipeline /tmp/sana-600m-random --preset sana-600m-1024 --resolution 1024 \\
        --batch 64 --grad-checkpointing --steps 30 --warmup 5 --workdir /tmp/bench-train \\
        --out /tmp/bench-train/throughput-b64-gc.json

2 GPUs (nvidia-h200-x2), global batch 32 (16 per GPU) in bf16 (bf16 weights under FSDP2 against bf16 autocast
over fp32 weights: expect relative loss differences of order 1e-3 to 1e-2), then in fp32 (rounding and CUDA's
non-deterministic kernels only: expect well below 1e-3; on the CPU it is below 1e-6):

    python bench/train_throughput.py --fsdp-compare --pipeline /tmp/sana-600m-random --preset sana-600m-1024 \\
        --resolution 1024 --batch 32 --steps 20 --warmup 5 --workdir /tmp/bench-train \\
        --out /tmp/bench-train/fsdp-compare-bf16.json
    python bench/train_throughput.py --fsdp-compare --precision fp32 --pipeline /tmp/sana-600m-random \\
        --preset sana-600m-1024 --resolution 1024 --batch 8 --steps 10 --warmup 3 --workdir /tmp/bench-train \\
        --out /tmp/bench-train/fsdp-compare-fp32.json

CPU smoke runs (tests/test_bench_scripts.py, with the tiny pipeline of tests/tiny.py and a tiny architecture):

    python bench/train_throughput.py --pipeline TINY_PIPELINE --arch-json tiny_arch.json --resolution 64 \\
        --images 8 --batch 2 --steps 4 --warmup 1 --device cpu --workdir /tmp/bench-train-tiny
    python bench/train_throughput.py --fsdp-compare ... (the same) --batch 4 --steps 3

Notes: `train` always saves a final checkpoint (weights, optimizer state, EMA: about 10 GB for 600M) when it ends,
after the timed steps (not measured; it is in the runs' wall_s); this script deletes it afterwards unless
--keep-checkpoints. The loop's DataLoader is not persistent: with --workers > 0 the workers restart at every pass
over the cache (every --images / --batch updates), so keep 0 (the default) unless --images is many times --batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sana.bench import matmul_tflops, transformer_flops
from sana.dataclass_io import from_dict, to_dict
from sana.errors import SanaError
from sana.models.transformer import TRANSFORMER_PRESETS, TransformerConfig
from sana.train.cache import build_cache_from_config
from sana.train.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    DistributedConfig,
    DType,
    LogBackend,
    LoggingConfig,
    MixedPrecision,
    ModelConfig,
    OptimConfig,
    OptimizerKind,
    ScheduleConfig,
    Strategy,
    TrainConfig,
    load_config,
)
from sana.train.loop import train

# NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, BF16 Tensor Core 1,979 TFLOPS "with sparsity"; dense is half.
H100_SXM_DENSE_BF16_TFLOPS = 989.0
BENCH = Path(__file__).resolve().parent
CAPTION_WORDS = ["a red fox", "a bowl of ramen", "an astronaut", "a lighthouse", "a cat", "a sailing boat"]
PLACES = ["in the snow", "on a wooden table", "at sunset", "in a forest", "on the moon", "under the sea"]


# ----------------------------------------------------------------------------------------------------------
# 1-3. Pipeline, images, cache


def ensure_pipeline(args: argparse.Namespace, workdir: Path) -> Path:
    """--pipeline, or a random-weight pipeline of --preset made by bench/make_random_pipeline.py (once)."""
    if args.pipeline:
        path = Path(args.pipeline)
        if not (path / "vae").is_dir() or not (path / "text_encoder").is_dir():
            raise SanaError(f"--pipeline {path}: expected a pipeline folder with vae/ and text_encoder/")
        return path
    if args.arch_json:
        raise SanaError("--arch-json needs --pipeline (whose text encoder width matches caption_channels)")
    path = workdir / f"pipeline-{args.preset}"
    if not (path / "model_index.json").exists():
        command = [sys.executable, str(BENCH / "make_random_pipeline.py"), "--preset", args.preset]
        command += ["--out", str(path), "--device", args.device]
        subprocess.run(command, check=True)
    return path


def write_images(folder: Path, n: int, resolution: int, seed: int) -> Path:
    """n smooth random RGB PNGs NNNNN.png (resolution a side) with a caption NNNNN.txt each; kept when present."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        caption = f"{CAPTION_WORDS[i % len(CAPTION_WORDS)]} {PLACES[(i // 6) % len(PLACES)]}, picture {i}"
        image, text = folder / f"{i:05d}.png", folder / f"{i:05d}.txt"
        if not image.exists():
            Image.fromarray(small).resize((resolution, resolution), Image.Resampling.BICUBIC).save(image)
        text.write_text(caption)
    return folder


def ensure_cache(base: TrainConfig, pipeline: Path, workdir: Path, n: int, seed: int) -> Path:
    """The `sana cache` of n images at base.data.resolution, encoded by the pipeline's DC-AE and text encoder."""
    resolution = base.data.resolution
    images = write_images(workdir / f"images-{resolution}-{n}", n, resolution, seed)
    tag = hashlib.sha1(str(pipeline.resolve()).encode()).hexdigest()[:8]
    cache = workdir / f"cache-{resolution}-{n}-{tag}"
    if not (cache / "index.json").exists():
        folder_cfg = dataclasses.replace(
            base, data=dataclasses.replace(base.data, source=DataSource.FOLDER, path=str(images))
        )
        info = build_cache_from_config(folder_cfg, cache, batch_size=8, progress=False)
        print(f"cached {info['samples']} samples in {cache}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return cache


# ----------------------------------------------------------------------------------------------------------
# The training config


def architecture(args: argparse.Namespace) -> TransformerConfig:
    if args.arch_json:
        return from_dict(TransformerConfig, json.loads(Path(args.arch_json).read_text()), where=args.arch_json)
    return TRANSFORMER_PRESETS[args.preset]


def base_config(args: argparse.Namespace, pipeline: Path, output_dir: Path) -> TrainConfig:
    """One process, data.path unset (the cache is filled in once built)."""
    bf16 = args.precision == "bf16"
    # The reference init (no init_from); the encoders only build the cache (training reads it).
    which = dict(arch=architecture(args)) if args.arch_json else dict(preset=args.preset)
    model = ModelConfig(
        **which,
        autoencoder=str(pipeline / "vae"),
        text_encoder=str(pipeline),
        gradient_checkpointing=args.grad_checkpointing,
    )
    return TrainConfig(
        output_dir=str(output_dir),
        seed=args.seed,
        device=args.device,
        mixed_precision=MixedPrecision.BF16 if bf16 else MixedPrecision.NO,
        model=model,
        data=DataConfig(
            source=DataSource.SYNTHETIC,  # replaced by the cache
            resolution=args.resolution,
            batch_size=args.batch,
            drop_last=True,  # every batch full: fixed shapes
            num_workers=args.workers,
        ),
        optim=OptimConfig(optimizer=OptimizerKind(args.optimizer), lr=1e-4, ema_decay=0.9999),
        schedule=ScheduleConfig(max_steps=args.steps, warmup_steps=0),
        checkpoint=CheckpointConfig(every_steps=0, keep_last=1, resume="", export=False),
        logging=LoggingConfig(every_steps=1, backend=LogBackend.JSONL, progress=False),
        distributed=DistributedConfig(
            strategy=Strategy.NONE, param_dtype=DType.BF16 if bf16 else DType.FP32, reduce_dtype=DType.FP32
        ),
    )


def with_cache(cfg: TrainConfig, cache: Path) -> TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=DataSource.CACHE, path=str(cache)))


def toml_text(data: dict[str, Any], comment: str = "") -> str:
    """A config table (`to_dict` of a TrainConfig) as TOML: scalars first, then one table per section."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    def table(name: str, d: dict[str, Any], lines: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict)}
        if name:
            lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{name}.{k}" if name else k, v, lines)

    lines = [f"# {line}" for line in comment.splitlines()]
    table("", data, lines)
    return "\n".join(lines) + "\n"


def drop_checkpoints(run_dir: Path, args: argparse.Namespace) -> None:
    """Remove the run's final checkpoint (large at full size) unless --keep-checkpoints."""
    if not args.keep_checkpoints and (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")


def fresh(run_dir: Path) -> Path:
    """An empty run folder (a previous run of this script there, recognised by its config.json, is removed)."""
    if (run_dir / "config.json").exists():
        shutil.rmtree(run_dir)
    return run_dir


# ----------------------------------------------------------------------------------------------------------
# 4. Throughput in this process


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        env["gpu_count"] = torch.cuda.device_count()
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def flops_per_sample(cfg: TrainConfig, cache: Path) -> float:
    """Forward FLOPs of one sample at the cached latent size and text length."""
    settings = json.loads((cache / "cache.json").read_text())
    side = cfg.data.resolution // settings["compression"]
    arch = cfg.model.transformer_config()
    return transformer_flops(arch, 1, side, side, text_len=settings["text_length"])


def throughput(args: argparse.Namespace, cfg: TrainConfig, cache: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    measured_peak = matmul_tflops() if cuda else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[int, float] = {}

    def on_step(step: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        times[step] = time.perf_counter()

    fresh(Path(cfg.output_dir))
    summary = train(cfg, on_step=on_step)
    drop_checkpoints(Path(cfg.output_dir), args)
    steps, warmup = cfg.schedule.max_steps, args.warmup
    samples_per_step = cfg.data.batch_size * cfg.optim.grad_accum
    timed_s = times[steps] - times[warmup]
    samples_per_s = samples_per_step * (steps - warmup) / timed_s
    fwd = flops_per_sample(cfg, cache)
    achieved = 3 * fwd * samples_per_s / 1e12  # model TFLOP/s
    result = {
        "samples_per_s": samples_per_s,
        "step_ms_mean": 1000 * timed_s / (steps - warmup),
        "step_ms": [1000 * (times[s] - times[s - 1]) for s in range(warmup + 1, steps + 1)],
        "timed_steps": steps - warmup,
        "samples_per_step": samples_per_step,
        "forward_gflops_per_sample": fwd / 1e9,
        "model_tflops_per_s": achieved,
        "peak_tflops_spec": args.peak_tflops,
        "mfu_vs_spec": achieved / args.peak_tflops,
        "matmul_tflops_measured": measured_peak,
        "mfu_vs_measured_matmul": achieved / measured_peak if measured_peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "losses": summary["losses"],
        "train_elapsed_s": summary["elapsed_s"],
    }
    return result


# ----------------------------------------------------------------------------------------------------------
# 5. FSDP2 on 2 processes against one process


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> float:
    """Run a command with its output in `log`; its wall time; SanaError with the log's tail when it fails."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SanaError(f"{' '.join(command[:8])} ... failed with code {done.returncode}:\n{tail}\n(log: {log})")
    return time.perf_counter() - start


def read_log(run_dir: Path, warmup: int, samples_per_step: int) -> dict[str, Any]:
    """Per-step losses and samples/s (steps after `warmup`) from a run's log.jsonl (logging.every_steps = 1)."""
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    timed = [x for x in lines if x["step"] > warmup]
    seconds = sum(1 / x["steps_per_s"] for x in timed)
    return {
        "losses": [x["loss"] for x in lines],
        "steps": [x["step"] for x in lines],
        "samples_per_s": samples_per_step * len(timed) / seconds if seconds else None,
        "step_ms_mean": 1000 * seconds / len(timed) if timed else None,
        "peak_mem_gib_rank0": lines[-1].get("gpu_mem_gib") if lines else None,
    }


def fsdp_compare(args: argparse.Namespace, cfg: TrainConfig, workdir: Path) -> dict[str, Any]:
    nproc = args.nproc
    if cfg.data.batch_size % nproc:
        raise SanaError(f"--batch {cfg.data.batch_size} (the global batch) must be a multiple of {nproc}")
    micro = cfg.data.batch_size // nproc
    fsdp = dataclasses.replace(
        cfg,
        output_dir=str(workdir / "run-fsdp2"),
        device="cuda" if torch.device(args.device).type == "cuda" else "cpu",  # torchrun: cuda:LOCAL_RANK
        data=dataclasses.replace(cfg.data, batch_size=micro),
        optim=dataclasses.replace(cfg.optim, grad_accum=1),
        distributed=dataclasses.replace(cfg.distributed, strategy=Strategy.FSDP2),
    )
    toml = workdir / "fsdp_compare.toml"
    comment = (
        f"bench/train_throughput.py --fsdp-compare: global batch {cfg.data.batch_size} = {nproc} processes x {micro}.\n"
        f"torchrun --standalone --nproc-per-node {nproc} -m sana train {toml.name} --set distributed.strategy=fsdp2\n"
        f"python -m sana train {toml.name} --set optim.grad_accum={nproc} --set distributed.strategy=none"
    )
    toml.write_text(toml_text(to_dict(fsdp), comment))
    if load_config(toml) != fsdp:
        raise SanaError(f"{toml} does not read back as the config it was written from")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fsdp.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # 2 processes share the cores
    one_dir, fsdp_dir = fresh(workdir / "run-one"), fresh(workdir / "run-fsdp2")
    one_cmd = [sys.executable, "-m", "sana", "train", str(toml), f"--set=output_dir={one_dir}"]
    one_cmd += [f"--set=optim.grad_accum={nproc}", "--set=distributed.strategy=none"]
    fsdp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    fsdp_cmd += ["-m", "sana", "train", str(toml), f"--set=output_dir={fsdp_dir}", "--set=distributed.strategy=fsdp2"]
    one_s = run_logged(one_cmd, workdir / "train-one.log", env)
    fsdp_s = run_logged(fsdp_cmd, workdir / "train-fsdp2.log", env)
    one = read_log(one_dir, args.warmup, cfg.data.batch_size)
    two = read_log(fsdp_dir, args.warmup, cfg.data.batch_size)
    drop_checkpoints(one_dir, args)
    drop_checkpoints(fsdp_dir, args)
    if one["steps"] != two["steps"] or len(one["losses"]) != cfg.schedule.max_steps:
        raise SanaError(
            f"the runs logged steps {one['steps']} and {two['steps']}, expected 1..{cfg.schedule.max_steps}"
        )
    rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(one["losses"], two["losses"], strict=True)]
    if not all(math.isfinite(x) for x in one["losses"] + two["losses"]):
        raise SanaError(f"non-finite losses: {one['losses']} / {two['losses']}")
    return {
        "config": str(toml),
        "global_batch": cfg.data.batch_size,
        "processes": nproc,
        "micro_batch": micro,
        "one_process": {**one, "grad_accum": nproc, "wall_s": one_s},
        "fsdp2": {**two, "grad_accum": 1, "wall_s": fsdp_s},
        "loss_rel_diff": rel,
        "max_rel_loss_diff": max(rel),
        "speedup": two["samples_per_s"] / one["samples_per_s"] if one["samples_per_s"] else None,
    }


# ----------------------------------------------------------------------------------------------------------
# Report


def print_table(report: dict[str, Any]) -> None:
    env, s = report["env"], report["settings"]
    what = s["arch_json"] or s["preset"]
    print(f"sana train throughput: {env['gpu'] or 'CPU'}, torch {env['torch']}, {env['date']}")
    print(
        f"  {what} at {s['resolution']} px, batch {s['batch']}, {s['optimizer']}, {s['precision']}, "
        f"grad checkpointing {s['grad_checkpointing']}, {s['steps']} steps ({s['warmup']} warm-up)"
    )
    if "throughput" in report:
        r = report["throughput"]
        measured = r["matmul_tflops_measured"]
        rows = [
            ("samples/s", f"{r['samples_per_s']:.3f}"),
            ("step time (ms)", f"{r['step_ms_mean']:.1f}"),
            ("forward GFLOP / sample", f"{r['forward_gflops_per_sample']:.1f}"),
            ("model TFLOP/s (3 x forward)", f"{r['model_tflops_per_s']:.2f}"),
            (f"MFU vs {r['peak_tflops_spec']:g} TFLOP/s spec", f"{100 * r['mfu_vs_spec']:.1f}%"),
        ]
        if measured:
            rows.append((f"MFU vs measured matmul {measured:.0f}", f"{100 * r['mfu_vs_measured_matmul']:.1f}%"))
        if r["peak_mem_gib"] is not None:
            rows.append(("peak GPU memory (GiB)", f"{r['peak_mem_gib']:.2f} (reserved {r['peak_reserved_gib']:.2f})"))
        rows.append(("loss first / last", f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}"))
    else:
        r = report["fsdp_compare"]
        one, two = r["one_process"], r["fsdp2"]
        rows = [
            ("global batch", f"{r['global_batch']} = {r['processes']} x {r['micro_batch']}"),
            ("samples/s one process", f"{one['samples_per_s']:.3f}"),
            (f"samples/s fsdp2 x{r['processes']}", f"{two['samples_per_s']:.3f}"),
            ("max rel. loss difference", f"{r['max_rel_loss_diff']:.2e}"),
        ]
        rows += [
            (f"  step {i + 1} loss", f"{a:.6f}  {b:.6f}")
            for i, (a, b) in enumerate(zip(one["losses"], two["losses"], strict=True))
        ]
    for name, value in rows:
        print(f"  {name:34s} {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument(
        "--preset",
        default="sana-600m-1024",
        choices=sorted(TRANSFORMER_PRESETS),
        help="transformer (default: %(default)s)",
    )
    ap.add_argument("--arch-json", default=None, help="a JSON file of TransformerConfig fields instead of --preset")
    ap.add_argument("--pipeline", default=None, help="pipeline folder for the DC-AE and text encoder (default: random)")
    ap.add_argument("--resolution", type=int, default=1024, help="image side (default: %(default)s)")
    ap.add_argument("--images", type=int, default=64, help="images in the cache (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="global batch per update (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer updates (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="updates left out of the timing (default: %(default)s)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in the backward")
    ap.add_argument(
        "--optimizer", choices=[k.value for k in OptimizerKind], default="came", help="(default: %(default)s)"
    )
    ap.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="bf16 autocast (FSDP2: bf16 gathered weights) or fp32 (default: bf16 on CUDA, fp32 on the CPU)",
    )
    ap.add_argument("--device", default=default_device, help="cuda or cpu (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_DENSE_BF16_TFLOPS,
        help="the GPU's peak dense bf16 TFLOP/s for MFU (default: %(default)s, H100 SXM per NVIDIA's datasheet)",
    )
    ap.add_argument("--fsdp-compare", action="store_true", help="FSDP2 on --nproc processes against one process")
    ap.add_argument("--nproc", type=int, default=2, help="processes of --fsdp-compare (default: %(default)s)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' final checkpoints")
    ap.add_argument("--workdir", default="runs/bench-train", help="images, cache and runs (default: %(default)s)")
    ap.add_argument(
        "--out", default=None, help="JSON report (default: WORKDIR/train_throughput.json or fsdp_compare.json)"
    )
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    if args.steps <= args.warmup or args.warmup < 1:
        ap.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup}) >= 1")
    if args.images < args.batch:
        ap.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or workdir / ("fsdp_compare.json" if args.fsdp_compare else "train_throughput.json"))
    device = torch.device(args.device)
    try:
        pipeline = ensure_pipeline(args, workdir)
        base = base_config(args, pipeline, workdir / "run-throughput")
        cache = ensure_cache(base, pipeline, workdir, args.images, args.seed)
        cfg = with_cache(base, cache)
        report: dict[str, Any] = {"settings": vars(args), "env": environment(device), "cache": str(cache)}
        if args.fsdp_compare:
            report["fsdp_compare"] = fsdp_compare(args, cfg, workdir)
        else:
            report["throughput"] = throughput(args, cfg, cache)
    except torch.cuda.OutOfMemoryError as e:
        print(
            f"train_throughput: error: out of GPU memory ({e}); try --grad-checkpointing or a smaller --batch",
            file=sys.stderr,
        )
        return 1
    except SanaError as e:
        print(f"train_throughput: error: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
