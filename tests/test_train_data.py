"""Training data: caption files, the CLIP-score caption sampler, aspect-ratio buckets, the one-bucket batch
sampler, corrupt images and empty folders."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from sana import resolution
from sana.train.data import (
    BucketBatchSampler,
    DataError,
    ImageFolderDataset,
    SyntheticDataset,
    bucket_table,
    caption_probabilities,
    closest_bucket,
    collate,
    iterate_batches,
    load_image,
    read_captions,
    sample_caption,
    scan_folder,
)
from train_tiny import make_image_folder, write_image, write_json_captions

# ----------------------------------------------------------------------------------------------------------
# Caption sampler


def test_caption_probabilities_closed_form():
    scores = {"a": 30.0, "b": 27.0, "c": 24.0, "d": 26.0}
    probs = caption_probabilities(list(scores), scores, threshold=25.0, temperature=0.1)
    # c is below the threshold; the others are weighted score ** 10.
    weights = {k: scores[k] ** 10 for k in ("a", "b", "d")}
    total = sum(weights.values())
    assert set(probs) == {"a", "b", "d"}
    for k, w in weights.items():
        assert probs[k] == pytest.approx(w / total, rel=1e-12)
    # Temperature floor 0.01: exponent 100.
    p = caption_probabilities(["a", "b"], {"a": 30.0, "b": 29.0}, 0.0, temperature=0.001)
    assert p["b"] / p["a"] == pytest.approx((29 / 30) ** 100, rel=1e-9)


def test_caption_fallbacks():
    # None passes the threshold: the best caption alone.
    assert caption_probabilities(["a", "b"], {"a": 20.0, "b": 22.0}, threshold=25.0) == {"b": 1.0}
    # No scores at all: uniform.
    assert caption_probabilities(["a", "b", "c"], {}) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # Captions without a score are not drawn when others have scores.
    assert set(caption_probabilities(["a", "b"], {"a": 30.0})) == {"a"}
    with pytest.raises(ValueError):
        caption_probabilities([], {})


def test_caption_sampler_frequencies_match_weights_chi_square():
    scores = {"prompt": 26.0, "vila": 27.5, "internvl": 28.0, "low": 10.0}
    names = list(scores)
    probs = caption_probabilities(names, scores, threshold=25.0, temperature=0.1)
    n = 20_000
    rng = np.random.default_rng(0)
    counts = Counter(sample_caption(names, scores, rng, 25.0, 0.1) for _ in range(n))
    assert counts["low"] == 0
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in probs.items())
    # 2 degrees of freedom: P(chi2 > 13.8) = 0.001.
    assert chi2 < 13.8, (chi2, counts, probs)
    # And the test has power: uniform frequencies would be far off.
    uniform_chi2 = sum((n / 3 - n * p) ** 2 / (n * p) for p in probs.values())
    assert uniform_chi2 > 100


# ----------------------------------------------------------------------------------------------------------
# Caption files and scanning


def test_read_captions_txt_json_and_both(tmp_path):
    img = write_image(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.txt").write_text("  a red fox \n")
    assert read_captions(img) == ({"prompt": "a red fox"}, {})
    write_json_captions(tmp_path / "a.json", {"vila": "A fox in snow", "blip": "fox"}, {"vila": 30.5, "blip": 20})
    captions, scores = read_captions(img)
    assert captions == {"prompt": "a red fox", "vila": "A fox in snow", "blip": "fox"}
    assert scores == {"vila": 30.5, "blip": 20.0}
    img2 = write_image(tmp_path / "b.png", 8, 8)
    write_json_captions(tmp_path / "b.json", ["one", "two"])
    assert read_captions(img2) == ({"0": "one", "1": "two"}, {})
    (tmp_path / "b.json").write_text('{"captions": 3}')
    with pytest.raises(DataError, match="captions"):
        read_captions(img2)


def test_scan_skips_and_counts_corrupt_and_uncaptioned(tmp_path):
    make_image_folder(tmp_path, [(32, 32), (32, 64)])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "broken.txt").write_text("a broken image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("an empty file")
    write_image(tmp_path / "nocap.png", 16, 16)
    (tmp_path / "sub").mkdir()
    make_image_folder(tmp_path / "sub", [(40, 20)])
    records, report = scan_folder(tmp_path)
    assert [r.name for r in records] == ["000", "001", "sub/000"]
    assert sorted(report.unreadable) == ["broken.png", "empty.jpg"]
    assert report.no_caption == ["nocap.png"]
    assert report.skipped == 3 and report.images == 6
    assert (records[1].height, records[1].width) == (32, 64)


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no usable image"):
        ImageFolderDataset(tmp_path)
    write_image(tmp_path / "x.png", 8, 8)  # an image without caption does not count
    with pytest.raises(DataError, match=r"1 image file\(s\), 1 without caption"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")


def test_image_that_fails_to_decode_is_skipped_and_counted(tmp_path):
    make_image_folder(tmp_path, [(32, 32), (32, 32), (32, 32)])
    # A PNG whose header reads but whose data is cut: passes the scan, fails at load time.
    data = (tmp_path / "001.png").read_bytes()
    (tmp_path / "001.png").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tmp_path, base_resolution=32, multiple=4)
    assert len(ds) == 3  # the header was readable
    batch = collate([ds[(i, 0)] for i in range(3)])
    assert batch["skipped"] == 1 and "001.png" in batch["errors"][0]
    assert batch["image"].shape == (2, 3, 32, 32) and batch["index"] == [0, 2]


# ----------------------------------------------------------------------------------------------------------
# Buckets and images


def test_bucket_tables():
    assert bucket_table(1024, 32) == dict(resolution.ASPECT_RATIO_1024)
    assert bucket_table(512, 32) == dict(resolution.ASPECT_RATIO_512)
    small = bucket_table(256, 32)  # the 1024 table scaled by 1/4, sides multiples of 32
    assert small["1.0"] == (256, 256) and small["0.5"] == (192, 352)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in small.values())
    assert closest_bucket(1000, 1000, bucket_table(1024)) == (1024, 1024)
    assert closest_bucket(600, 1200, bucket_table(1024)) == (704, 1408)  # ratio 0.5
    assert closest_bucket(3000, 1000, bucket_table(1024)) == (1728, 576)  # ratio 3.0


def test_load_image_covers_and_centre_crops(tmp_path):
    # Left half black, right half white, 40x80 (ratio 0.5) into a 32x32 bucket: the crop keeps the middle.
    from PIL import Image

    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 40:] = 255
    Image.fromarray(array).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png", (32, 32))
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    assert img[:, :, :8].max() < -0.9 and img[:, :, -8:].min() > 0.9  # black left, white right
    # RGBA is composed over white.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png", (8, 8)).min() == 1.0


# ----------------------------------------------------------------------------------------------------------
# Batch sampler


def _buckets(n=50):
    sizes = [(32, 32), (32, 64), (64, 32), (48, 48)]
    rng = np.random.default_rng(1)
    return [sizes[i] for i in rng.integers(0, len(sizes), n)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_never_mix_buckets_and_cover_the_epoch(drop_last):
    buckets = _buckets()
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=3, drop_last=drop_last)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        seen = [i for b in batches for i, _ in b]
        assert len(seen) == len(set(seen))  # each sample at most once per epoch
        for batch in batches:
            assert len({buckets[i] for i, _ in batch}) == 1
            assert len(batch) == 4 if drop_last else 1 <= len(batch) <= 4
        if not drop_last:
            assert sorted(seen) == list(range(len(buckets)))
        else:
            counts = Counter(buckets)
            assert len(seen) == sum(c // 4 * 4 for c in counts.values())


def test_sampler_is_deterministic_and_epochs_differ():
    a = BucketBatchSampler(_buckets(), 4, seed=3)
    b = BucketBatchSampler(_buckets(), 4, seed=3)
    c = BucketBatchSampler(_buckets(), 4, seed=4)
    assert a.epoch_batches(2) == b.epoch_batches(2)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.epoch_batches(0) != c.epoch_batches(0)
    seeds = [s for batch in a.epoch_batches(0) for _, s in batch]
    assert len(set(seeds)) == len(seeds)  # one seed per sample


def test_ranks_partition_an_epoch():
    buckets = _buckets(60)
    full = BucketBatchSampler(buckets, 4, seed=0).epoch_batches(0)
    parts = [BucketBatchSampler(buckets, 4, seed=0, rank=r, world_size=3).epoch_batches(0) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    interleaved = [b for group in zip(*parts, strict=True) for b in group]
    assert interleaved == full[: len(interleaved)]


def test_sampler_without_a_full_batch_errors():
    with pytest.raises(DataError, match="no batch of 8"):
        BucketBatchSampler([(1, 1)] * 5, batch_size=8, drop_last=True)


def test_iterate_batches_resumes_at_a_position():
    ds = SyntheticDataset(10, 2, 2, 3, 4, seed=0)
    sampler = BucketBatchSampler(ds.buckets, 3, seed=1)  # 4 batches an epoch: 3, 3, 3, 1
    full = iterate_batches(ds, sampler, epoch=0, position=0)
    seq = [next(full) for _ in range(7)]
    assert [(e, p) for e, p, _ in seq] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3)]
    resumed = iterate_batches(ds, sampler, epoch=0, position=3)
    for (e, p, batch), (e2, p2, batch2) in zip(seq[3:], [next(resumed) for _ in range(4)], strict=True):
        assert (e, p) == (e2, p2) and batch["index"] == batch2["index"]
        assert torch.equal(batch["latent"], batch2["latent"])


def test_folder_dataset_batches_have_one_shape(tmp_path):
    sizes = [(32, 32), (32, 64), (64, 32), (32, 32), (32, 64), (64, 32), (30, 34), (66, 30)]
    make_image_folder(tmp_path, sizes, captions=["a cat", "a dog"])
    ds = ImageFolderDataset(tmp_path, base_resolution=32, multiple=4)
    sampler = BucketBatchSampler(ds.buckets, 2, seed=0)
    shapes = set()
    for _, _, batch in _take(iterate_batches(ds, sampler, 0, 0, num_workers=0), 8):
        shape = tuple(batch["image"].shape[-2:])  # stacked: one shape per batch
        assert all(ds.buckets[i] == shape for i in batch["index"])
        shapes.add(shape)
        assert all(c in ("a cat", "a dog") for c in batch["caption"])
    assert {(32, 32), (24, 44), (44, 24)} <= shapes  # square, landscape and portrait buckets all occurred


def test_caption_choice_depends_only_on_the_sample_seed(tmp_path):
    make_image_folder(tmp_path, [(32, 32)])
    write_json_captions(tmp_path / "000.json", {"a": "first", "b": "second"}, {"a": 30.0, "b": 30.0})
    ds = ImageFolderDataset(tmp_path, base_resolution=32, multiple=4)
    picks = [ds[(0, s)]["caption"] for s in range(200)]
    assert picks == [ds[(0, s)]["caption"] for s in range(200)]
    counts = Counter(picks)
    # "prompt" (from the .txt, unscored) is not drawn; a and b are equally likely.
    assert set(counts) == {"first", "second"}
    assert abs(counts["first"] - 100) < 5 * math.sqrt(50)


def _take(it, n):
    return [next(it) for _ in range(n)]
