"""WebDataset tar shards: the same samples as the image folder they were packed from, one bucket per batch,
resumable positions, corrupt members skipped and counted, the index cache reused and rebuilt, and a tiny run."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from sana.train import webdataset
from sana.train.config import DataConfig, DataSource, ModelConfig, ScheduleConfig
from sana.train.data import BucketBatchSampler, DataError, ImageFolderDataset, collate, iterate_batches
from sana.train.loop import train
from sana.train.webdataset import INDEX_SUFFIX, WebDatasetShards, find_shards
from train_tiny import (
    TINY_ARCH,
    make_image_folder,
    save_tiny_autoencoder,
    save_tiny_text_encoder,
    tiny_config,
    write_image,
    write_json_captions,
)

SIZES = [(32, 32), (32, 64), (64, 32), (32, 32), (40, 40), (64, 32), (32, 64), (32, 32)]


def pack(folder: Path, out: Path, per_shard: int) -> Path:
    """Tar shards of `folder`'s files in sorted order, `per_shard` samples (keys) a shard."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({p.name.split(".")[0] for p in folder.iterdir()})
    for s in range(0, len(keys), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for key in keys[s : s + per_shard]:
                for path in sorted(folder.glob(f"{key}.*")):
                    tar.add(path, arcname=path.name)
    return out


def add_member(tar_path: Path, name: str, data: bytes) -> None:
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def folder(tmp_path):
    root = make_image_folder(tmp_path / "images", SIZES)
    # Several captions with CLIP scores for some samples, so the caption sampler has a choice to make.
    write_json_captions(root / "001.json", {"vila": "a long caption", "short": "short"}, {"vila": 30.0, "short": 29})
    write_json_captions(root / "004.json", ["first", "second", "third"])
    (root / "006.txt").unlink()
    write_json_captions(root / "006.json", {"a": "only json"}, {"a": 31.5})
    (root / "007.txt").write_text("line one\r\nline two\n")
    return root


def test_shards_yield_the_same_samples_as_the_folder(tmp_path, folder):
    shards = pack(folder, tmp_path / "shards", per_shard=3)
    ref = ImageFolderDataset(folder, base_resolution=64, multiple=32, clip_threshold=25.0, clip_temperature=0.5)
    wds = WebDatasetShards(shards, base_resolution=64, multiple=32, clip_threshold=25.0, clip_temperature=0.5)
    assert len(find_shards(shards)) == 3 and len(wds) == len(ref) == len(SIZES)
    assert [r.name for r in wds.records] == [r.name for r in ref.records]
    assert [(r.height, r.width) for r in wds.records] == [(r.height, r.width) for r in ref.records]
    assert [r.captions for r in wds.records] == [r.captions for r in ref.records]
    assert [r.clip_scores for r in wds.records] == [r.clip_scores for r in ref.records]
    assert wds.buckets == ref.buckets and len(set(ref.buckets)) > 1
    chosen = set()
    for index in range(len(ref)):
        for seed in range(6):
            a, b = ref[index, seed], wds[index, seed]
            assert a["caption"] == b["caption"] and a["index"] == b["index"] == index
            assert torch.equal(a["image"], b["image"])
            chosen.add((index, a["caption"]))
    assert {c for i, c in chosen if i == 4} == {"a picture number 4", "first", "second", "third"}  # a choice
    # A glob of shards is the same set.
    assert [r.name for r in WebDatasetShards(str(shards / "shard-*.tar"), 64).records] == [r.name for r in ref.records]


def test_batches_never_mix_buckets_and_resume_at_a_position(tmp_path, folder):
    wds = WebDatasetShards(pack(folder, tmp_path / "shards", per_shard=3), base_resolution=64)
    sampler = BucketBatchSampler(wds.buckets, batch_size=2, seed=3)
    n = len(sampler.epoch_batches(0))
    full = iterate_batches(wds, sampler, epoch=0, position=0)
    run = [next(full) for _ in range(n + 2)]  # into the next epoch
    for _, _, batch in run:
        assert batch["skipped"] == 0
        assert len({wds.buckets[i] for i in batch["index"]}) == 1
        assert batch["image"].shape[-2:] == wds.buckets[batch["index"][0]]
    resumed = iterate_batches(wds, sampler, epoch=0, position=3)
    for (e, p, want), (e2, p2, got) in zip(run[3:], resumed, strict=False):
        assert (e, p, want["index"], want["caption"]) == (e2, p2, got["index"], got["caption"])
        assert torch.equal(want["image"], got["image"])


def test_corrupt_members_are_skipped_and_counted(tmp_path, folder):
    shards = pack(folder, tmp_path / "shards", per_shard=4)
    png = (folder / "000.png").read_bytes()
    add_member(shards / "shard-001.tar", "zz_garbage.png", b"not an image at all")
    add_member(shards / "shard-001.tar", "zz_garbage.txt", b"a caption")
    add_member(shards / "shard-001.tar", "zz_cut.png", png[: len(png) // 2])  # header fine, pixels cut
    add_member(shards / "shard-001.tar", "zz_cut.txt", b"a cut image")
    add_member(shards / "shard-001.tar", "zz_nocaption.png", png)
    add_member(shards / "shard-001.tar", "zz_badjson.png", png)
    add_member(shards / "shard-001.tar", "zz_badjson.json", b"{not json")
    wds = WebDatasetShards(shards, base_resolution=64)
    assert wds.report.images == len(SIZES) + 4
    assert wds.report.unreadable == ["shard-001.tar:zz_garbage"]
    assert wds.report.no_caption == ["shard-001.tar:zz_nocaption", "shard-001.tar:zz_badjson"]
    assert wds.report.bad_caption_file == ["shard-001.tar:zz_badjson"] and wds.report.skipped == 3
    assert [r.name for r in wds.records][-1] == "zz_cut" and len(wds) == len(SIZES) + 1
    batch = collate([wds[len(wds) - 1, 0], wds[0, 0]])
    assert batch["skipped"] == 1 and "zz_cut" in batch["errors"][0] and batch["index"] == [0]


def test_empty_sets_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no .tar shard"):
        WebDatasetShards(tmp_path)
    only_text = tmp_path / "a.tar"
    with tarfile.open(only_text, "w"):
        pass
    add_member(only_text, "x.txt", b"a caption without an image")
    with pytest.raises(DataError, match="no usable sample in 1 shard"):
        WebDatasetShards(tmp_path)


def test_index_cache_is_reused_and_rebuilt_when_a_shard_changes(tmp_path, folder, monkeypatch):
    shards = pack(folder, tmp_path / "shards", per_shard=4)
    first = WebDatasetShards(shards, base_resolution=64)
    caches = sorted(p.name for p in shards.iterdir() if p.name.endswith(INDEX_SUFFIX))
    assert caches == ["shard-000.tar.index.json", "shard-001.tar.index.json"]

    calls = []
    real_index_shard = webdataset.index_shard
    monkeypatch.setattr(webdataset, "index_shard", lambda shard: calls.append(shard.name) or real_index_shard(shard))
    again = WebDatasetShards(shards, base_resolution=64)
    assert calls == [] and again.records == first.records

    write_image(tmp_path / "extra.png", 32, 64, seed=99)
    add_member(shards / "shard-001.tar", "zz_extra.png", (tmp_path / "extra.png").read_bytes())
    add_member(shards / "shard-001.tar", "zz_extra.txt", b"an extra picture")
    changed = WebDatasetShards(shards, base_resolution=64)
    assert calls == ["shard-001.tar"] and len(changed) == len(first) + 1
    assert changed.records[-1].name == "zz_extra" and changed.records[-1].captions == {"prompt": "an extra picture"}
    assert changed[len(changed) - 1, 0]["image"].shape[1:] == changed.buckets[-1] == (32, 96)

    # Same size, new modification time: rebuilt too; a damaged cache file is rebuilt rather than trusted.
    os.utime(shards / "shard-000.tar", ns=(1, 1))
    (shards / "shard-001.tar.index.json").write_text("{broken")
    calls.clear()
    assert WebDatasetShards(shards, base_resolution=64).records == changed.records
    assert sorted(calls) == ["shard-000.tar", "shard-001.tar"]
    assert json.loads((shards / "shard-001.tar.index.json").read_text())["shard_mtime_ns"] > 1


def test_tiny_training_run_from_shards(tmp_path):
    root = tmp_path / "encoders"
    root.mkdir()
    ae_path, te_path = save_tiny_autoencoder(root / "ae.safetensors"), save_tiny_text_encoder(root / "te")
    folder = make_image_folder(tmp_path / "images", [(32, 32), (32, 64), (64, 32), (32, 32), (40, 40), (32, 32)])
    shards = pack(folder, tmp_path / "shards", per_shard=2)
    cfg = tiny_config(
        tmp_path / "run",
        model=ModelConfig(arch=TINY_ARCH, autoencoder=str(ae_path), text_encoder=str(te_path), chi=False),
        data=DataConfig(source=DataSource.WEBDATASET, path=str(shards), resolution=32, batch_size=2, num_workers=1),
        schedule=ScheduleConfig(max_steps=4, warmup_steps=1),
    )
    summary = train(cfg)
    assert summary["step"] == 4 and summary["images_skipped"] == 0
    assert all(map(torch.isfinite, map(torch.tensor, summary["losses"])))
