"""Precomputed training features: DC-AE latents and Gemma-2 caption embeddings in sharded safetensors files.

`build_cache` encodes an image folder (see `sana.train.data`) once, so that training needs neither the
autoencoder nor the text encoder (the reference's `load_vae_feat` / `load_text_feat`). Layout of the cache folder:

    cache.json                 settings the features depend on (checked when a build is resumed)
    null.safetensors           "text" (1, L, D), "mask" (1, L): the null caption for caption dropout
    shard-00000.safetensors    per sample j of the shard: "{j}.latent" (C, h, w) fp32 scaled latent,
                               "{j}.text.{k}" (n_k, D) and "{j}.mask.{k}" (n_k,) for its caption k, cut after the
                               last real token; metadata "samples": JSON list of the shard's samples
    index.json                 written last: every sample (shard, slot, name, latent size, captions, scores)

Shard k holds records [k S, (k + 1) S) of the sorted folder scan. Shards are written atomically, so a build that
was interrupted resumes by skipping the shards that exist. Caption embeddings are stored up to their last real
token and padded back with zeros (mask 0) when read: the transformer ignores masked tokens, so its output is the
same as with the text encoder's own padding.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from sana.models.dcae import DCAE
from sana.models.text_encoder import TextEncoder
from sana.train.config import TrainConfig
from sana.train.data import (
    IMAGE_ERRORS,
    DataError,
    Record,
    SampleKey,
    bucket_table,
    closest_bucket,
    load_image,
    sample_caption,
    scan_folder,
)
from sana.train.model import chi_lines, load_autoencoder_for, load_text_encoder_for, resolve_device
from sana.weights.io import read_safetensors, write_json, write_safetensors

CACHE_FORMAT = "sana-train-cache"
CACHE_VERSION = 1


def encode_images(autoencoder: DCAE, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents x0 = encode(img) * scaling_factor, fp32 (B, C, h, w)."""
    with torch.no_grad():
        z = autoencoder.encode(images.to(device=autoencoder.device, dtype=autoencoder.dtype))
    return z.float() * autoencoder.scaling_factor


def encode_captions(text_encoder: TextEncoder, captions: list[str], chi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (embeds (B, L, D), mask (B, L)) as the training loop feeds them (with the CHI when `chi`)."""
    return text_encoder.encode(captions, chi=chi_lines(chi))


def _records_digest(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.name, r.height, r.width, r.captions, r.clip_scores], sort_keys=True).encode())
    return h.hexdigest()


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def build_cache(
    data_root: str | Path,
    out_dir: str | Path,
    autoencoder: DCAE,
    text_encoder: TextEncoder,
    resolution: int = 1024,
    chi: bool = True,
    shard_size: int = 1000,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode the image folder `data_root` into the cache folder `out_dir` (resumable; see the module doc).

    resolution: base of the aspect-ratio buckets (as `data.resolution` of a training config); chi: prepend
    the Complex Human Instruction to the captions (as `model.chi`). Returns a summary: samples, shards
    written and reused, images skipped (with reasons).
    """
    from tqdm.auto import tqdm

    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    out = Path(out_dir)
    records, report = scan_folder(data_root)
    if not records:
        raise DataError(f"no usable image in {data_root}: found {report.describe()}")
    f = autoencoder.config.spatial_compression
    null_text, null_mask = text_encoder.null_embedding()
    settings = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "resolution": resolution,
        "compression": f,
        "latent_channels": autoencoder.config.latent_channels,
        "scaling_factor": autoencoder.scaling_factor,
        "text_length": int(null_text.shape[1]),
        "text_dim": int(null_text.shape[2]),
        "chi": chi,
        "shard_size": shard_size,
        "records": len(records),
        "records_digest": _records_digest(records),
    }
    settings_path = out / "cache.json"
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise DataError(
                f"{out} holds a cache built with other settings ({', '.join(diff)} differ): use a new folder, "
                "or delete this one to rebuild it"
            )
    else:
        write_json(settings_path, settings)
    write_safetensors(out / "null.safetensors", {"text": null_text.cpu(), "mask": null_mask.cpu()})

    table = bucket_table(resolution, f)
    num_shards = (len(records) + shard_size - 1) // shard_size
    written = reused = 0
    bar = tqdm(total=len(records), desc="caching", unit="img", disable=not progress)
    for k in range(num_shards):
        path = out / _shard_name(k)
        shard_records = records[k * shard_size : (k + 1) * shard_size]
        if path.exists():
            reused += 1
            bar.update(len(shard_records))
            continue
        tensors, samples, skipped = _encode_shard(
            shard_records, autoencoder, text_encoder, table, chi, batch_size, data_root
        )
        meta = {"samples": json.dumps(samples), "skipped": json.dumps(skipped)}
        write_safetensors(path, tensors, meta)
        written += 1
        bar.update(len(shard_records))
    bar.close()

    # The index, from every shard's metadata (so that it is the same whether or not the build was resumed).
    samples, skipped = [], list(report.unreadable) + list(report.no_caption)
    for k in range(num_shards):
        with safe_open(str(out / _shard_name(k)), framework="pt") as fh:
            meta = fh.metadata()
        for s in json.loads(meta["samples"]):
            samples.append({"shard": _shard_name(k), **s})
        skipped += json.loads(meta["skipped"])
    if not samples:
        raise DataError(f"no image of {data_root} could be encoded ({len(skipped)} skipped)")
    write_json(out / "index.json", {"settings": settings, "samples": samples, "skipped": skipped})
    return {
        "out_dir": str(out),
        "samples": len(samples),
        "shards_written": written,
        "shards_reused": reused,
        "skipped": len(skipped),
        "skipped_files": skipped,
    }


def _encode_shard(
    records: list[Record],
    autoencoder: DCAE,
    text_encoder: TextEncoder,
    table: dict[str, tuple[int, int]],
    chi: bool,
    batch_size: int,
    root: str | Path,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[str]]:
    """Tensors, sample entries and skipped files of one shard (slot j = position of the record in the shard)."""
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    buckets = [closest_bucket(r.height, r.width, table) for r in records]

    # Images, batched within each bucket.
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for j, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(j)

    def load(j: int, bucket) -> torch.Tensor | None:
        try:
            return load_image(records[j].image, bucket)
        except IMAGE_ERRORS:
            return None

    # Decoding and resizing release the GIL: threads keep the encoders fed on a many-core machine.
    pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
    for bucket, slots in by_bucket.items():
        for start in range(0, len(slots), batch_size):
            good, images = [], []
            chunk = slots[start : start + batch_size]
            for j, image in zip(chunk, pool.map(lambda j, b=bucket: load(j, b), chunk), strict=True):
                if image is None:
                    skipped.append(str(records[j].image.relative_to(root)))
                else:
                    images.append(image)
                    good.append(j)
            if good:
                latents = encode_images(autoencoder, torch.stack(images)).cpu()
                for j, latent in zip(good, latents, strict=True):
                    tensors[f"{j}.latent"] = latent.clone()

    pool.shutdown()

    # Captions of the images that encoded, batched across images.
    encoded = sorted({int(key.split(".")[0]) for key in tensors})
    items = [(j, c, text) for j in encoded for c, text in enumerate(records[j].captions.values())]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        embeds, masks = encode_captions(text_encoder, [text for _, _, text in chunk], chi)
        for (j, c, _), embed, mask in zip(chunk, embeds.cpu(), masks.cpu(), strict=True):
            n = int(mask.nonzero().max()) + 1 if mask.any() else 1  # up to the last real token
            tensors[f"{j}.text.{c}"] = embed[:n].clone()
            tensors[f"{j}.mask.{c}"] = mask[:n].clone()

    samples = [
        {
            "slot": j,
            "name": records[j].name,
            "latent_size": list(tensors[f"{j}.latent"].shape[1:]),
            "captions": list(records[j].captions),
            "clip_scores": records[j].clip_scores,
        }
        for j in encoded
    ]
    return tensors, samples, skipped


def build_cache_from_config(
    cfg: TrainConfig, out_dir: str | Path, shard_size: int = 1000, batch_size: int = 8, progress: bool = True
) -> dict[str, Any]:
    """`build_cache` for a training config: its image folder (data.path), bucket resolution, CHI setting, and the
    DC-AE and text encoder of [model] on its device (bf16 on CUDA). Train from the result with
    `--set data.source=cache --set data.path=OUT_DIR`."""
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autoencoder = load_autoencoder_for(cfg.model, device, dtype)
    text_encoder = load_text_encoder_for(cfg.model, device, dtype)
    return build_cache(
        cfg.data.path,
        out_dir,
        autoencoder,
        text_encoder,
        resolution=cfg.data.resolution,
        chi=cfg.model.chi,
        shard_size=shard_size,
        batch_size=batch_size,
        progress=progress,
    )


class CachedDataset(Dataset):
    """Samples of a `build_cache` folder, bucketed by latent size, one caption drawn by CLIP score.

    Item (index, sample_seed) -> {"latent": (C, h, w) fp32, "text": (L, D), "mask": (L,), "index": int}.
    """

    def __init__(self, root: str | Path, clip_threshold: float = 25.0, clip_temperature: float = 0.1):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.exists():
            hint = " (the build did not finish: run it again to resume)" if (self.root / "cache.json").exists() else ""
            raise DataError(f"{self.root} is not a finished training cache: no index.json{hint}")
        try:
            index = json.loads(index_path.read_text())
            self.settings: dict[str, Any] = index["settings"]
            self.samples: list[dict[str, Any]] = index["samples"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{index_path}: unreadable cache index ({e})") from e
        if self.settings.get("format") != CACHE_FORMAT or self.settings.get("version") != CACHE_VERSION:
            raise DataError(f"{self.root}: not a version-{CACHE_VERSION} {CACHE_FORMAT} folder")
        if not self.samples:
            raise DataError(f"{self.root}: the cache holds no sample")
        null, _ = read_safetensors(self.root / "null.safetensors")
        self.null_text, self.null_mask = null["text"], null["mask"]
        self.text_length = int(self.settings["text_length"])
        self.buckets = [tuple(s["latent_size"]) for s in self.samples]
        self.clip_threshold, self.clip_temperature = clip_threshold, clip_temperature
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):  # open shard handles stay in their process (DataLoader workers open their own)
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The null caption (1, L, D) and its mask (1, L)."""
        return self.null_text, self.null_mask

    def _shard(self, name: str):
        if name not in self._files:
            self._files[name] = safe_open(str(self.root / name), framework="pt")
        return self._files[name]

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key
        s = self.samples[index]
        shard, j = self._shard(s["shard"]), s["slot"]
        name = sample_caption(
            s["captions"], s["clip_scores"], np.random.default_rng(seed), self.clip_threshold, self.clip_temperature
        )
        c = s["captions"].index(name)
        text, mask = shard.get_tensor(f"{j}.text.{c}"), shard.get_tensor(f"{j}.mask.{c}")  # (n, D), (n,)
        n, L = text.shape[0], self.text_length
        text = torch.cat([text, text.new_zeros(L - n, text.shape[1])])  # (L, D)
        mask = torch.cat([mask, mask.new_zeros(L - n)])  # (L,)
        return {"latent": shard.get_tensor(f"{j}.latent"), "text": text, "mask": mask, "index": index}
