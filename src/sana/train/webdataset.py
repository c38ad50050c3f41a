"""Training images from WebDataset tar shards (`data.source = "webdataset"`), read by random access.

`data.path` is a folder (its `*.tar` files, searched recursively) or a glob of shards; shards are sorted by path.
Inside a shard, files are grouped by key, the member name up to the first dot of its basename:

    shard-000.tar:  cat.jpg  cat.txt  dog.png  dog.json  ...   (captions as in `sana.train.data`)

Each shard is indexed once, in member order: for every sample the data offset and size of its image member,
its image size (for the aspect-ratio buckets) and its captions. The index is cached beside the shard as
SHARD.tar.index.json, rebuilt when the shard's size or modification time changes (and not written where the
folder is read-only). Samples are then read by seeking into the tar, so the bucket batch sampler of
`sana.train.data` works unchanged. Shards must be uncompressed tar files. Members whose image header cannot be
read and images without caption are skipped and counted when indexing; images that fail to decode later are
skipped batch by batch and counted by the training loop. A set with no usable sample is a `DataError`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sana.train.data import (
    IMAGE_ERRORS,
    IMAGE_EXTENSIONS,
    CaptionedImages,
    DataError,
    ScanReport,
    image_size,
    parse_captions,
)

INDEX_SUFFIX = ".index.json"
INDEX_VERSION = 1
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class TarRecord:
    """One sample of a shard: where its image member's data lies, and its captions."""

    shard: int  # index into the dataset's shard list
    offset: int  # byte offset of the image data in the shard
    size: int  # bytes of image data
    name: str  # the sample key
    height: int  # after EXIF orientation
    width: int
    captions: dict[str, str]  # caption name -> text, in file order
    clip_scores: dict[str, float]  # caption name -> CLIP score (may be empty)


def find_shards(path: str | Path) -> list[Path]:
    """The sorted `*.tar` shards of a folder (recursively) or of a glob pattern."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.rglob("*.tar") if p.is_file())
    else:
        shards = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    if not shards:
        raise DataError(f"no .tar shard found at {path}")
    return shards


def _split_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member: "a/b.seg.png" -> ("a/b", "seg.png")."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(shard: Path) -> dict[str, Any]:
    """Scan one shard: {"samples": [{name, offset, size, height, width, captions, clip_scores}], "unreadable",
    "no_caption", "bad_caption_file", "images"} (names of skipped samples are "SHARD:KEY")."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}  # key -> ext -> member, keys in member order
    result: dict[str, Any] = {"samples": [], "images": 0, "unreadable": [], "no_caption": [], "bad_caption_file": []}
    with open(shard, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        key, ext = _split_key(member.name)
                        groups.setdefault(key, {}).setdefault(ext, member)
        except (tarfile.TarError, OSError) as e:  # a damaged shard: keep the members read before the damage
            result["unreadable"].append(f"{shard.name}: {type(e).__name__}: {e}")

        def read(member: tarfile.TarInfo) -> bytes:
            f.seek(member.offset_data)
            return f.read(member.size)

        def read_text(member: tarfile.TarInfo) -> str:  # newlines as Path.read_text reads them
            return read(member).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")

        for key, members in groups.items():
            image_ext = next((e for e in members if e in _IMAGE_EXTS), None)
            if image_ext is None:
                continue
            result["images"] += 1
            where = f"{shard.name}:{key}"
            try:
                json_text = read_text(members["json"]) if "json" in members else None
                txt_text = read_text(members["txt"]) if "txt" in members else None
                captions, scores = parse_captions(json_text, txt_text, f"{where}.json")
            except (DataError, UnicodeDecodeError, OSError):
                result["bad_caption_file"].append(where)
                captions, scores = {}, {}
            if not captions:
                result["no_caption"].append(where)
                continue
            image = members[image_ext]
            try:
                data = read(image)
                if len(data) != image.size:
                    raise EOFError(f"{len(data)} of {image.size} bytes")
                height, width = image_size(io.BytesIO(data))
            except IMAGE_ERRORS:
                result["unreadable"].append(where)
                continue
            result["samples"].append(
                {
                    "name": key,
                    "offset": image.offset_data,
                    "size": image.size,
                    "height": height,
                    "width": width,
                    "captions": captions,
                    "clip_scores": scores,
                }
            )
    return result


def load_index(shard: Path) -> dict[str, Any]:
    """`index_shard(shard)`, from SHARD.tar.index.json when that was written for the shard's current size and
    modification time; otherwise built and written there (atomically; skipped when the folder is read-only)."""
    stat = shard.stat()
    stamp = {"version": INDEX_VERSION, "shard_size": stat.st_size, "shard_mtime_ns": stat.st_mtime_ns}
    cache = shard.with_name(shard.name + INDEX_SUFFIX)
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in stamp.items()):
            return cached["index"]
    except (OSError, ValueError, KeyError):
        pass
    index = index_shard(shard)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({**stamp, "index": index}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)
    return index


class WebDatasetShards(CaptionedImages):
    """The samples of WebDataset tar shards, bucketed by aspect ratio, one caption each sampled by CLIP score.

    Items as `ImageFolderDataset`: (index, sample_seed) -> {"image": (3, h, w) in [-1, 1], "caption": str,
    "index": int}, or {"error": message, "index": int} when the image fails to decode.
    """

    def __init__(
        self,
        path: str | Path,
        base_resolution: int = 1024,
        multiple: int = 32,
        clip_threshold: float = 25.0,
        clip_temperature: float = 0.1,
    ):
        self.path = Path(path)
        self.shards = find_shards(self.path)
        records: list[TarRecord] = []
        self.report = ScanReport()
        for shard_id, shard in enumerate(self.shards):
            index = load_index(shard)
            self.report.images += index["images"]
            self.report.unreadable += index["unreadable"]
            self.report.no_caption += index["no_caption"]
            self.report.bad_caption_file += index["bad_caption_file"]
            records += [TarRecord(shard=shard_id, **s) for s in index["samples"]]
        if not records:
            raise DataError(f"no usable sample in {len(self.shards)} shard(s) at {self.path}: {self.report.describe()}")
        self._bucket(records, base_resolution, multiple, clip_threshold, clip_temperature)

    def _open(self, record: TarRecord) -> tuple[io.BytesIO, str]:
        shard = self.shards[record.shard]
        with open(shard, "rb") as f:
            f.seek(record.offset)
            data = f.read(record.size)
        return io.BytesIO(data), f"{shard}:{record.name}"
