"""The shapes training set, written in the trainer's image-folder format (`sana.train.data`):

    OUT/shapes.json                     the manifest: format version, size, seed, scene config, n
    OUT/0000/0000000.png                image 0 (1000 images per folder)
    OUT/0000/0000000.json               {"captions": {"full": ..., "shapes": ..., ...}, "scene": ground truth}

Image i is a pure function of (seed, i, size, config): the data set does not depend on the number of workers,
and a run that stops part-way resumes by skipping every image whose .png and .json both exist (the .json is
written last; both are written to a temporary name and renamed). The trainer reads "captions" and ignores
"scene", which holds the ground truth: the background and every object's shape, colour, size, centre, radius,
rotation, bounding box and drawn colour (see `scene.Scene.to_dict`).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sana.errors import ConfigError
from sana.shapes.captions import scene_captions
from sana.shapes.scene import Colour, SceneConfig, Shape, render, sample_scene

FORMAT = "sana-shapes"
VERSION = 1
MANIFEST = "shapes.json"
PER_FOLDER = 1000
_TRAIN_DOMAIN = 0x7A1  # the first word of every training seed; ShapesEval uses another
_CHUNK = 64  # images per task handed to a worker


@dataclass(frozen=True)
class GenerateReport:
    out_dir: Path
    n: int
    written: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def sample_name(index: int) -> str:
    """The path of image `index` relative to the data set root, without extension."""
    return f"{index // PER_FOLDER:04d}/{index:07d}"


def make_sample(index: int, size: int, seed: int, config: SceneConfig) -> tuple[bytes, bytes]:
    """The PNG bytes and JSON bytes of image `index`."""
    rng = np.random.default_rng(np.random.SeedSequence([_TRAIN_DOMAIN, seed, index]))
    scene = sample_scene(rng, size, config)
    captions = scene_captions(scene, rng)
    buffer = io.BytesIO()
    render(scene).save(buffer, format="PNG", compress_level=3)
    meta = {"captions": captions, "scene": scene.to_dict()}
    return buffer.getvalue(), (json.dumps(meta, ensure_ascii=False) + "\n").encode()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_chunk(args: tuple[str, list[int], int, int, dict[str, Any]]) -> tuple[int, int]:
    """Write the samples of one chunk that are not complete yet; returns (written, skipped)."""
    out_dir, indices, size, seed, config_dict = args
    root, config = Path(out_dir), SceneConfig.from_dict(config_dict)
    written = 0
    for index in indices:
        base = root / sample_name(index)
        png, meta = base.with_suffix(".png"), base.with_suffix(".json")
        if png.exists() and meta.exists():
            continue
        png_bytes, meta_bytes = make_sample(index, size, seed, config)
        base.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(png, png_bytes)
        _write_atomic(meta, meta_bytes)
        written += 1
    return written, len(indices) - written


def _check_manifest(root: Path, n: int, size: int, seed: int, config: SceneConfig) -> None:
    """Write the manifest, or check that an existing one describes the same data set (n may grow)."""
    path = root / MANIFEST
    wanted = {"format": FORMAT, "version": VERSION, "size": size, "seed": seed, "config": config.to_dict()}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable manifest ({e})") from e
        for key, value in wanted.items():
            if old.get(key) != value:
                raise ConfigError(
                    f"{root} holds a shapes data set with {key}={old.get(key)!r}, not {value!r}: use another folder"
                )
        n = max(n, int(old.get("n", 0)))
    _write_atomic(path, (json.dumps({**wanted, "n": n}, indent=1) + "\n").encode())


def generate_dataset(
    out_dir: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    config: SceneConfig | None = None,
) -> GenerateReport:
    """Write images 0..n-1 of the shapes data set (size x size pixels) to `out_dir`, skipping complete ones.

    `workers` processes (default: one per CPU; 0 or 1: in this process). The files are the same for any
    number of workers. Raises ConfigError if `out_dir` holds a data set made with another size, seed or config.
    """
    config = config or SceneConfig()
    if n < 0 or seed < 0:
        raise ConfigError(f"need n >= 0 and seed >= 0, got n={n}, seed={seed}")
    if not 32 <= size <= 4096:
        raise ConfigError(f"size must be in [32, 4096], got {size}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _check_manifest(root, n, size, seed, config)
    config_dict = config.to_dict()
    tasks = [(str(root), list(range(i, min(i + _CHUNK, n))), size, seed, config_dict) for i in range(0, n, _CHUNK)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="image", desc=f"shapes {size}px")
    written = skipped = 0
    start = time.perf_counter()
    if workers <= 1 or len(tasks) <= 1:
        results = map(_write_chunk, tasks)
        pool = None
    else:
        # fork where there is one: a spawned worker would import torch (through `sana`) before its first image.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = context.Pool(min(workers, len(tasks)))
        results = pool.imap_unordered(_write_chunk, tasks)
    try:
        for w, s in results:
            written, skipped = written + w, skipped + s
            if bar is not None:
                bar.update(w + s)
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    return GenerateReport(root, n, written, skipped, time.perf_counter() - start)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a shapes data set manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def dataset_seen_pairs(out_dir: str | Path) -> frozenset[tuple[Colour, Shape]]:
    """The (colour, shape) pairs a shapes data set can contain: every pair but the config's holdout."""
    config = SceneConfig.from_dict(read_manifest(out_dir)["config"])
    return frozenset((c, s) for c in Colour for s in Shape if (c, s) not in config.holdout)
