"""The feature cache: what it stores equals on-the-fly encoding, training from it gives the same losses as
training on the images, an interrupted build resumes, and bad caches are clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sana.models.text_encoder import TextEncoder
from sana.models.transformer import SanaTransformer
from sana.train.cache import CachedDataset, build_cache, build_cache_from_config, encode_captions, encode_images
from sana.train.config import DataConfig, DataSource, ModelConfig
from sana.train.data import DataError, ImageFolderDataset, load_image
from sana.train.loop import train
from sana.weights.load import load_autoencoder
from train_tiny import (
    TINY_ARCH,
    make_image_folder,
    save_tiny_autoencoder,
    save_tiny_text_encoder,
    tiny_config,
    write_json_captions,
)

SIZES = [(32, 32), (32, 64), (64, 32), (32, 32), (36, 30), (32, 64), (32, 32)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ae_path = save_tiny_autoencoder(root / "ae.safetensors")
    te_path = save_tiny_text_encoder(root / "te")
    return ae_path, te_path, load_autoencoder(ae_path), TextEncoder.from_pretrained(te_path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("images"), SIZES, captions=["a cat", "a red fox in the snow"])
    write_json_captions(
        root / "001.json",
        {"vila": "A small cat on a sofa", "blip": "cat"},
        {"vila": 30.0, "blip": 29.0, "prompt": 26.0},
    )
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "broken.txt").write_text("broken")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory, folder, models):
    _, _, ae, te = models
    out = tmp_path_factory.mktemp("cache")
    summary = build_cache(folder, out, ae, te, resolution=32, shard_size=3, batch_size=2, progress=False)
    return out, summary


def test_cache_round_trip_equals_on_the_fly_encoding(folder, models, cache):
    _, _, ae, te = models
    out, summary = cache
    assert summary["samples"] == len(SIZES) and summary["skipped"] == 1 and summary["shards_written"] == 3
    cached = CachedDataset(out)
    images = ImageFolderDataset(folder, base_resolution=32, multiple=ae.config.spatial_compression)
    assert len(cached) == len(images) == len(SIZES)
    model = SanaTransformer(TINY_ARCH).eval()
    null_text, null_mask = te.null_embedding()
    assert torch.equal(cached.null_embedding()[0], null_text) and torch.equal(cached.null_embedding()[1], null_mask)
    for index in range(len(SIZES)):
        record = images.records[index]
        # Latents: the encoder on this one image.
        expected_latent = encode_images(ae, load_image(record.image, images.buckets[index])[None])[0]
        for seed in range(4):
            item = cached[(index, seed)]
            torch.testing.assert_close(item["latent"], expected_latent, rtol=1e-5, atol=1e-6)
            # The same caption as the image folder draws for this seed, and the same features.
            caption = images[(index, seed)]["caption"]
            text, mask = encode_captions(te, [caption], chi=True)
            n = int(mask.sum())
            assert torch.equal(item["mask"], mask[0])
            assert item["text"].shape == text[0].shape
            torch.testing.assert_close(item["text"][:n], text[0, :n], rtol=1e-5, atol=1e-6)
            # Padding differs (zeros vs the encoder's pad states) but the transformer ignores it.
            x = expected_latent[None]
            t = torch.tensor([0.3])
            with torch.no_grad():
                v_cached = model(x, t, item["text"][None], item["mask"][None])
                v_fly = model(x, t, text, mask)
            torch.testing.assert_close(v_cached, v_fly, rtol=1e-5, atol=1e-6)


def test_cached_sample_has_its_bucket_shape(cache):
    out, _ = cache
    cached = CachedDataset(out)
    for index, bucket in enumerate(cached.buckets):
        assert tuple(cached[(index, 0)]["latent"].shape[1:]) == bucket


def test_training_from_cache_matches_training_on_images(tmp_path, folder, models, cache):
    ae_path, te_path, _, _ = models
    out, _ = cache
    model = ModelConfig(arch=TINY_ARCH, autoencoder=str(ae_path), text_encoder=str(te_path))
    on_images = tiny_config(
        tmp_path / "images",
        model=model,
        data=DataConfig(source=DataSource.FOLDER, path=str(folder), resolution=32, batch_size=2, num_workers=0),
        # A tiny learning rate: the runs see the same batches, captions, noise and dropout; the features differ
        # only by float rounding (batched vs single encoding), which larger updates would amplify step by step.
        optim=dataclasses.replace(tiny_config(tmp_path).optim, lr=1e-7),
    )
    on_cache = dataclasses.replace(
        on_images,
        output_dir=str(tmp_path / "cache"),
        data=dataclasses.replace(on_images.data, source=DataSource.CACHE, path=str(out)),
    )
    a, b = train(on_images), train(on_cache)
    assert a["images_skipped"] == 0  # the broken image is dropped at the scan, not during training
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    assert len(a["losses"]) == on_images.schedule.max_steps


def test_interrupted_build_resumes(tmp_path, folder, models, cache):
    _, _, ae, te = models
    out, _ = cache
    index = json.loads((out / "index.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        if f.name not in ("index.json", "shard-00001.safetensors"):  # a build killed during shard 1
            (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="did not finish"):
        CachedDataset(copy)
    summary = build_cache(folder, copy, ae, te, resolution=32, shard_size=3, batch_size=2, progress=False)
    assert summary["shards_reused"] == 2 and summary["shards_written"] == 1
    assert json.loads((copy / "index.json").read_text()) == index


def test_build_with_other_settings_is_refused(folder, models, cache):
    _, _, ae, te = models
    out, _ = cache
    with pytest.raises(DataError, match="resolution"):
        build_cache(folder, out, ae, te, resolution=64, shard_size=3, batch_size=2, progress=False)


def test_not_a_cache(tmp_path):
    with pytest.raises(DataError, match="not a finished training cache"):
        CachedDataset(tmp_path)


def test_build_from_a_training_config(tmp_path, folder, models, cache):
    ae_path, te_path, _, _ = models
    out, _ = cache
    cfg = tiny_config(
        tmp_path / "run",
        model=ModelConfig(arch=TINY_ARCH, autoencoder=str(ae_path), text_encoder=str(te_path)),
        data=DataConfig(source=DataSource.FOLDER, path=str(folder), resolution=32),
    )
    summary = build_cache_from_config(cfg, tmp_path / "c", shard_size=3, batch_size=2, progress=False)
    assert summary["samples"] == len(SIZES)
    assert json.loads((tmp_path / "c" / "index.json").read_text()) == json.loads((out / "index.json").read_text())
