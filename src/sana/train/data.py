"""Training data: an image folder with captions, the CLIP-score caption sampler, aspect-ratio buckets, a batch
sampler that never mixes buckets, cached latents (see `sana.train.cache`) and a synthetic set for smoke tests.

Image folder layout (searched recursively; names sorted, so the order is stable):

    photos/cat.jpg   photos/cat.txt           one caption: the whole file, stripped
    photos/dog.png   photos/dog.json          several captions, optionally with CLIP scores:
        {"captions": {"prompt": "a dog", "vila": "A brown dog on grass"}, "clip_scores": {"prompt": 27.1, "vila": 31.0}}
        or {"captions": ["a dog", "a brown dog"]}; other keys of the file are ignored

With both files, the .txt caption joins the JSON ones under the name "prompt" (unless the JSON has one). Images
without a caption, and images whose header cannot be read, are skipped and counted when the folder is scanned;
images that fail to decode later are skipped batch by batch and counted by the training loop. A folder with no
usable image is a `DataError`.

Every dataset is indexed by (index, sample_seed): the sampler draws one seed per sample from (seed, epoch,
batch, slot), so that a caption choice never depends on worker processes or on where a run was resumed.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from sana import resolution
from sana.errors import SanaError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What PIL raises for broken files: truncated data, bad chunks, decompression bombs, bad headers.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112
_EXIF_FORMATS = ("JPEG", "MPO", "WEBP", "TIFF")

Bucket = tuple[int, int]  # (height, width) in pixels, or (h, w) of a latent
SampleKey = tuple[int, int]  # (index, sample_seed)


class DataError(SanaError, ValueError):
    """A data set cannot be used: the message names the folder and what was found."""


# ----------------------------------------------------------------------------------------------------------
# Scanning an image folder


@dataclass(frozen=True)
class Record:
    """One image and its captions, as found on disk."""

    image: Path
    name: str  # path relative to the root, without the extension
    height: int  # after EXIF orientation
    width: int
    captions: dict[str, str]  # caption name -> text, in file order
    clip_scores: dict[str, float]  # caption name -> CLIP score (may be empty)


@dataclass
class ScanReport:
    """What a folder scan found and skipped (paths relative to the root)."""

    images: int = 0
    unreadable: list[str] = field(default_factory=list)
    no_caption: list[str] = field(default_factory=list)
    bad_caption_file: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.unreadable) + len(self.no_caption)

    def describe(self) -> str:
        parts = [f"{self.images} image file(s)"]
        for label, items in (
            ("unreadable", self.unreadable),
            ("without caption", self.no_caption),
            ("with an invalid caption file", self.bad_caption_file),
        ):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        return ", ".join(parts)


def read_captions(image: Path) -> tuple[dict[str, str], dict[str, float]]:
    """Captions and CLIP scores of `image` from NAME.txt and/or NAME.json beside it. Raises DataError for a
    caption file that exists but cannot be used."""
    json_path, txt_path = image.with_suffix(".json"), image.with_suffix(".txt")
    json_text = txt_text = None
    if json_path.exists():
        try:
            json_text = json_path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise DataError(f"{json_path}: {e}") from e
    if txt_path.exists():
        try:
            txt_text = txt_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{txt_path}: {e}") from e
    return parse_captions(json_text, txt_text, str(json_path))


def parse_captions(
    json_text: str | None, txt_text: str | None, json_name: str = "captions.json"
) -> tuple[dict[str, str], dict[str, float]]:
    """Captions and CLIP scores from the text of a NAME.json and/or NAME.txt (None where there is none), in the
    layout of the module doc. Raises DataError, naming `json_name`, for JSON that cannot be used."""
    captions: dict[str, str] = {}
    scores: dict[str, float] = {}
    if json_text is not None:
        try:
            meta = json.loads(json_text)
        except ValueError as e:
            raise DataError(f"{json_name}: {e}") from e
        raw = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(raw, list):
            raw = {str(i): text for i, text in enumerate(raw)}
        if not isinstance(raw, dict) or not all(isinstance(t, str) for t in raw.values()):
            raise DataError(f'{json_name}: expected {{"captions": {{name: text}}}} or {{"captions": [text, ...]}}')
        captions = {str(k): t.strip() for k, t in raw.items() if t.strip()}
        raw_scores = meta.get("clip_scores", {})
        if isinstance(raw_scores, list):
            raw_scores = {str(i): s for i, s in enumerate(raw_scores)}
        if not isinstance(raw_scores, dict) or not all(
            isinstance(s, int | float) and not isinstance(s, bool) for s in raw_scores.values()
        ):
            raise DataError(f'{json_name}: "clip_scores" must map caption names to numbers')
        scores = {str(k): float(s) for k, s in raw_scores.items() if str(k) in captions}
    if txt_text is not None:
        text = txt_text.strip()
        if text and "prompt" not in captions:
            captions = {"prompt": text, **captions}
    return captions, scores


def image_size(path: Path | IO[bytes]) -> tuple[int, int]:
    """(height, width) of an image (a path or an open binary file) from its header, after EXIF orientation;
    raises one of IMAGE_ERRORS."""
    with Image.open(path) as im:
        width, height = im.size
        # EXIF orientation, read from the header of the formats that carry it there (a PNG's EXIF would need
        # the whole image decoded); 5-8 rotate by 90 or 270 degrees.
        if im.format in _EXIF_FORMATS and im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}x{height}")
    return height, width


def scan_folder(root: str | Path) -> tuple[list[Record], ScanReport]:
    """Every usable image under `root` (recursively, sorted) and a report of what was skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    report = ScanReport(images=len(paths))
    records = []
    for path in paths:
        rel = str(path.relative_to(root))
        try:
            captions, scores = read_captions(path)
        except DataError:
            report.bad_caption_file.append(rel)
            captions, scores = {}, {}
        if not captions:
            report.no_caption.append(rel)
            continue
        try:
            height, width = image_size(path)
        except IMAGE_ERRORS:
            report.unreadable.append(rel)
            continue
        name = str(path.relative_to(root).with_suffix(""))
        records.append(Record(path, name, height, width, captions, scores))
    return records, report


# ----------------------------------------------------------------------------------------------------------
# CLIP-score caption sampler (reference section 9.2)


def caption_probabilities(
    captions: Sequence[str], scores: Mapping[str, float], threshold: float = 25.0, temperature: float = 0.1
) -> dict[str, float]:
    """P(caption) proportional to score ** (1 / max(temperature, 0.01)) over captions scoring >= threshold.

    If none passes, the best-scoring caption alone; if no caption has a score, uniform over all captions.
    """
    if not captions:
        raise ValueError("no captions")
    scored = [c for c in captions if c in scores]
    if not scored:
        return {c: 1.0 / len(captions) for c in captions}
    kept = [c for c in scored if scores[c] >= threshold and scores[c] > 0]
    if not kept:
        best = max(scored, key=lambda c: scores[c])
        return {best: 1.0}
    exponent = 1.0 / max(temperature, 0.01)
    top = max(scores[c] for c in kept)
    weights = {c: (scores[c] / top) ** exponent for c in kept}  # divided by the top score: no overflow
    total = sum(weights.values())
    return {c: w / total for c, w in weights.items()}


def sample_caption(
    captions: Sequence[str],
    scores: Mapping[str, float],
    rng: np.random.Generator,
    threshold: float = 25.0,
    temperature: float = 0.1,
) -> str:
    """One caption name drawn from `caption_probabilities` (one uniform draw from `rng`)."""
    probs = caption_probabilities(captions, scores, threshold, temperature)
    names = list(probs)
    cumulative = np.cumsum([probs[n] for n in names])
    i = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return names[min(i, len(names) - 1)]


# ----------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets (reference section 9.3)

_STANDARD_TABLES = {
    512: resolution.ASPECT_RATIO_512,
    1024: resolution.ASPECT_RATIO_1024,
    2048: resolution.ASPECT_RATIO_2048,
    4096: resolution.ASPECT_RATIO_4096,
}


def bucket_table(base: int, multiple: int = 32) -> dict[str, Bucket]:
    """Ratio key (H/W) -> (height, width) of the buckets for base resolution `base`.

    512/1024/2048/4096 use Sana's tables (when their sides are multiples of `multiple`); other sizes scale the
    1024 table by base / 1024 and round each side to a multiple of `multiple` (at least `multiple`).
    """
    if base < multiple or multiple < 1:
        raise ValueError(f"bucket base {base} must be >= multiple {multiple} >= 1")
    table = _STANDARD_TABLES.get(base)
    if table is not None and all(h % multiple == 0 and w % multiple == 0 for h, w in table.values()):
        return dict(table)
    return dict(resolution.scaled_table(base, multiple))


def closest_bucket(height: int, width: int, table: Mapping[str, Bucket]) -> Bucket:
    """The bucket whose ratio key is closest to height / width (the first on a tie)."""
    ratio = height / width
    return table[min(table, key=lambda k: abs(float(k) - ratio))]


def load_image(path: Path | IO[bytes], size: Bucket) -> torch.Tensor:
    """The image resized (bicubic; Lanczos from 2048 px) to cover `size` = (h, w), centre-cropped, as a
    (3, h, w) float tensor in [-1, 1]. Transparent pixels are composed over white. Raises one of IMAGE_ERRORS."""
    h, w = size
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        scale = max(h / im.height, w / im.width)
        new_w, new_h = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        method = Image.Resampling.LANCZOS if max(h, w) >= 2048 else Image.Resampling.BICUBIC
        im = im.resize((new_w, new_h), method)
        left, top = (new_w - w) // 2, (new_h - h) // 2
        im = im.crop((left, top, left + w, top + h))
        array = np.asarray(im, dtype=np.uint8)  # (h, w, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, h, w)


# ----------------------------------------------------------------------------------------------------------
# Batches from one bucket at a time


def sample_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """The seed of one sample's randomness (its caption choice) from its place in the data order."""
    return int(np.random.SeedSequence([seed, epoch, batch, slot]).generate_state(1)[0])


class BucketBatchSampler:
    """Batches of (index, sample_seed) whose samples all share one bucket.

    Epoch e: each bucket's indices are shuffled (buckets in sorted order) and cut into batches of
    `batch_size` (the last one shorter unless `drop_last`), then the batches of all buckets are shuffled
    together; everything is drawn from a generator seeded with (seed, e), so an epoch's order is a pure
    function of (seed, e) and a run resumes at any (epoch, batch) position. With world_size > 1, rank r takes
    batches r, r + world_size, ... of an epoch cut to a multiple of world_size.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = {b: groups[b] for b in sorted(groups)}
        if not self.epoch_batches(0):
            sizes = {b: len(v) for b, v in self.groups.items()}
            raise DataError(
                f"no batch of {batch_size} in any bucket (bucket sizes {sizes}, drop_last={drop_last}, "
                f"{world_size} process(es)): lower data.batch_size or turn off data.drop_last"
            )

    def epoch_batches(self, epoch: int) -> list[list[SampleKey]]:
        """This rank's batches of `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for indices in self.groups.values():
            order = rng.permutation(len(indices))
            shuffled = [indices[i] for i in order]
            for start in range(0, len(shuffled), self.batch_size):
                chunk = shuffled[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) // self.world_size * self.world_size
        mine = range(self.rank, usable, self.world_size)
        return [[(index, sample_seed(self.seed, epoch, b, j)) for j, index in enumerate(batches[b])] for b in mine]


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of the good samples; samples that failed to load ({"error": ...}) are counted."""
    good = [s for s in samples if "error" not in s]
    batch: dict[str, Any] = {
        "skipped": len(samples) - len(good),
        "errors": [s["error"] for s in samples if "error" in s],
    }
    if good:
        for key in good[0]:
            values = [s[key] for s in good]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def iterate_batches(
    dataset: Dataset, sampler: BucketBatchSampler, epoch: int, position: int, num_workers: int = 0
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, position after this batch, batch) from batch `position` of `epoch` on, forever."""
    while True:
        plan = sampler.epoch_batches(epoch)[position:]
        loader = DataLoader(
            dataset,
            batch_sampler=plan,
            num_workers=num_workers,
            collate_fn=collate,
            generator=torch.Generator(),  # worker seeds without touching the global RNG
            persistent_workers=False,
        )
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------
# Datasets


class CaptionedImages(Dataset):
    """Records (image + captions + size) bucketed by aspect ratio, one caption each sampled by CLIP score.

    Item (index, sample_seed) -> {"image": (3, h, w) in [-1, 1], "caption": str, "index": int}, or
    {"error": message, "index": int} when the image fails to decode. Subclasses find the records and open images.
    """

    def _bucket(self, records, base_resolution: int, multiple: int, clip_threshold: float, clip_temperature: float):
        self.records = records
        self.table = bucket_table(base_resolution, multiple)
        self.buckets: list[Bucket] = [closest_bucket(r.height, r.width, self.table) for r in self.records]
        self.clip_threshold, self.clip_temperature = clip_threshold, clip_temperature

    def _open(self, record) -> tuple[Any, str]:
        """(a path or binary file of the image, its name for error messages)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def caption_name(self, index: int, seed: int) -> str:
        r = self.records[index]
        rng = np.random.default_rng(seed)
        return sample_caption(list(r.captions), r.clip_scores, rng, self.clip_threshold, self.clip_temperature)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key
        record = self.records[index]
        name = str(index)
        try:
            source, name = self._open(record)
            image = load_image(source, self.buckets[index])
        except IMAGE_ERRORS as e:
            return {"error": f"{name}: {type(e).__name__}: {e}", "index": index}
        return {"image": image, "caption": record.captions[self.caption_name(index, seed)], "index": index}


class ImageFolderDataset(CaptionedImages):
    """The images of a folder with their captions beside them (`NAME.txt` or `NAME.json`); see CaptionedImages."""

    def __init__(
        self,
        root: str | Path,
        base_resolution: int = 1024,
        multiple: int = 32,
        clip_threshold: float = 25.0,
        clip_temperature: float = 0.1,
    ):
        self.root = Path(root)
        records, self.report = scan_folder(self.root)
        if not records:
            raise DataError(f"no usable image in {self.root}: found {self.report.describe()}")
        self._bucket(records, base_resolution, multiple, clip_threshold, clip_temperature)

    def _open(self, record) -> tuple[Any, str]:
        return record.image, str(record.image)


class SyntheticDataset(Dataset):
    """`num_samples` fixed random (latent, text) pairs drawn from `seed`: training without files.

    Item -> {"latent": (C, h, w), "text": (L, D), "mask": (L,), "index"}; sample i has i % L + 1 real tokens.
    """

    def __init__(
        self, num_samples: int, latent_channels: int, latent_size: int, text_length: int, text_dim: int, seed=0
    ):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(num_samples, latent_channels, latent_size, latent_size, generator=g)
        self.text = torch.randn(num_samples, text_length, text_dim, generator=g)
        lengths = torch.arange(num_samples) % text_length + 1
        self.mask = (torch.arange(text_length)[None] < lengths[:, None]).long()  # (N, L)
        self.null_text = torch.randn(1, text_length, text_dim, generator=g)
        self.buckets: list[Bucket] = [(latent_size, latent_size)] * num_samples

    def __len__(self) -> int:
        return len(self.latents)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.null_text, torch.zeros(1, self.null_text.shape[1], dtype=torch.long).index_fill_(
            1, torch.tensor([0]), 1
        )

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, _ = key
        return {"latent": self.latents[index], "text": self.text[index], "mask": self.mask[index], "index": index}
