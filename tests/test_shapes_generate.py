"""The shapes generator: deterministic files, resumable runs, captions that are true of their images, the
trainer's folder format, and speed."""

import io
import itertools
import json
import time

import numpy as np
import pytest
from PIL import Image

from sana.errors import ConfigError
from sana.shapes import (
    Caption,
    Colour,
    Phrase,
    Relation,
    Scene,
    SceneConfig,
    Shape,
    Size,
    check_caption,
    dataset_seen_pairs,
    generate_dataset,
    make_sample,
    parse_caption,
    render,
    sample_scene,
    scene_captions,
)
from sana.shapes.captions import caption_text
from sana.shapes.scene import BACKGROUNDS, PALETTE, Background, SceneObject, coverage, footprint_overlap
from sana.shapes.vision import LAB_WEIGHTS, srgb_to_lab


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    generate_dataset(tmp_path / "a", 40, size=64, seed=3, workers=1, progress=False)
    generate_dataset(tmp_path / "b", 40, size=64, seed=3, workers=1, progress=False)
    generate_dataset(tmp_path / "c", 40, size=64, seed=4, workers=1, progress=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 2 * 40 + 1  # png + json per image, and the manifest
    assert a == b
    assert sum(a[k] != c.get(k) for k in a if k.endswith(".png")) >= 35  # another seed: other images


def test_number_of_workers_does_not_change_the_files(tmp_path):
    generate_dataset(tmp_path / "one", 150, size=48, seed=1, workers=1, progress=False)  # 3 chunks of 64
    report = generate_dataset(tmp_path / "two", 150, size=48, seed=1, workers=2, progress=False)
    assert report.written == 150 and report.skipped == 0
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_rerun_skips_complete_images_and_redoes_incomplete_ones(tmp_path):
    root = tmp_path / "ds"
    generate_dataset(root, 30, size=48, seed=2, workers=1, progress=False)
    before = _files(root)
    (root / "0000" / "0000005.json").unlink()  # stopped after the png
    (root / "0000" / "0000007.png").unlink()
    report = generate_dataset(root, 30, size=48, seed=2, workers=1, progress=False)
    assert (report.written, report.skipped) == (2, 28)
    assert _files(root) == before
    grown = generate_dataset(root, 45, size=48, seed=2, workers=1, progress=False)
    assert (grown.written, grown.skipped) == (15, 30)
    assert json.loads((root / "shapes.json").read_text())["n"] == 45
    assert not list(root.rglob("*.tmp"))


def test_another_size_seed_or_config_in_the_same_folder_is_refused(tmp_path):
    generate_dataset(tmp_path, 4, size=48, seed=0, workers=1, progress=False)
    with pytest.raises(ConfigError, match="size=48"):
        generate_dataset(tmp_path, 4, size=64, seed=0, workers=1, progress=False)
    with pytest.raises(ConfigError, match="seed=0"):
        generate_dataset(tmp_path, 4, size=48, seed=1, workers=1, progress=False)
    with pytest.raises(ConfigError, match="config"):
        generate_dataset(tmp_path, 4, size=48, seed=0, workers=1, progress=False, config=SceneConfig(max_objects=2))


def test_the_trainer_reads_the_folder(tmp_path):
    from sana.train.data import scan_folder

    generate_dataset(tmp_path, 12, size=64, seed=0, workers=1, progress=False)
    records, report = scan_folder(tmp_path)
    assert len(records) == 12 and report.skipped == 0 and not report.bad_caption_file
    for record in records:
        assert {"full", "shapes"} <= set(record.captions) and (record.height, record.width) == (64, 64)
        meta = json.loads(record.image.with_suffix(".json").read_text())
        assert record.captions == meta["captions"]


def _samples(n, size=128, seed=0, config=None):
    config = config or SceneConfig()
    for i in range(n):
        png, meta = make_sample(i, size, seed, config)
        yield png, json.loads(meta)


def test_every_caption_is_true_of_its_ground_truth(tmp_path):
    kinds = set()
    relations = set()
    for _, meta in _samples(300):
        scene = Scene.from_dict(meta["scene"])
        assert 1 <= len(scene.objects) <= 4
        for name, text in meta["captions"].items():
            caption = parse_caption(text)
            assert check_caption(caption, scene) == [], (name, text, meta["scene"])
            kinds.add(name)
            relations.add(caption.relation)
            if name in ("full", "shapes"):  # these name every object
                assert sum(p.count for p in caption.phrases) == len(scene.objects), text
    assert kinds == {"full", "shapes", "object", "count", "relation"}
    assert relations == {None, *Relation}


def test_the_record_reproduces_the_image():
    for png, meta in _samples(40):
        scene = Scene.from_dict(meta["scene"])
        drawn = np.asarray(render(scene))
        stored = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert np.array_equal(drawn, stored)
        for k, obj in enumerate(scene.objects):  # drawn in its colour at its centre (a ring: on its band)
            x, y = obj.centre
            if obj.shape is Shape.RING:
                x += 0.78 * obj.radius
            occluded = any(_covers(o, x, y) for o in scene.objects[k + 1 :])
            if not occluded:
                assert np.abs(stored[int(y), int(x)].astype(int) - obj.rgb).max() <= 1


def _covers(obj: SceneObject, x: float, y: float) -> bool:
    cov = coverage(obj.shape, obj.centre, obj.radius, obj.rotation)
    j, i = int(y) - cov.y0, int(x) - cov.x0
    return 0 <= j < cov.alpha.shape[0] and 0 <= i < cov.alpha.shape[1] and cov.alpha[j, i] > 0


def test_check_caption_rejects_false_captions():
    obj = SceneObject(Shape.STAR, Colour.RED, Size.SMALL, (40.0, 64.0), 15.0, 0.0, (25, 49, 55, 79), (225, 25, 30))
    other = SceneObject(Shape.RING, Colour.BLUE, Size.LARGE, (100.0, 64.0), 20.0, 0.0, (80, 44, 120, 84), (0, 0, 255))
    scene = Scene(128, Background("white", (255, 255, 255), (255, 255, 255)), (obj, other))
    assert check_caption(parse_caption("a red star left of a blue ring"), scene) == []
    assert check_caption(parse_caption("a red star right of a blue ring"), scene)
    assert check_caption(parse_caption("a blue star"), scene)
    assert check_caption(parse_caption("two red stars"), scene)
    assert check_caption(parse_caption("a star and a ring on a black background"), scene)
    assert check_caption(parse_caption("a small red star and a large blue ring on a white background"), scene) == []
    assert check_caption(parse_caption("a large red star"), scene)


def test_captions_parse_back_and_bad_ones_are_refused():
    rng = np.random.default_rng(0)

    def pick(options):
        return options[int(rng.integers(len(options)))]

    for _ in range(300):
        shapes = [list(Shape)[i] for i in rng.permutation(len(Shape))]
        k = int(rng.integers(1, 4))
        phrases = tuple(
            Phrase(int(rng.integers(1, 5)), shapes[i], pick([None, *Colour]), pick([None, *Size])) for i in range(k)
        )
        relation = None
        if k == 2 and rng.random() < 0.5:
            phrases = tuple(Phrase(1, p.shape, p.colour, p.size) for p in phrases)
            relation = pick(list(Relation))
        background = pick([None, *BACKGROUNDS, "gradient"])
        caption = Caption(phrases, relation, background)
        assert parse_caption(caption_text(caption, rng)) == caption
        assert parse_caption(caption_text(caption)) == caption
    for bad in ("a red blob", "two star", "a stars", "three circles left of a ring", "a purple"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_overlap_is_limited_and_same_colours_stay_apart():
    config = SceneConfig()
    size = 128
    for i in range(200):
        scene = sample_scene(np.random.default_rng(i), size, config)
        covs = [coverage(o.shape, o.centre, o.radius, o.rotation) for o in scene.objects]
        for (a, ca), (b, cb) in itertools.combinations(zip(scene.objects, covs, strict=True), 2):
            area = min(np.count_nonzero(ca.footprint), np.count_nonzero(cb.footprint))
            assert footprint_overlap(ca, cb) <= config.max_overlap * area
            if a.colour is b.colour:
                assert footprint_overlap(ca, cb, grow=1) == 0
            x0, y0, x1, y1 = a.bbox  # inside the image
            assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size


def test_holdout_pairs_are_never_drawn(tmp_path):
    holdout = frozenset({(Colour.RED, Shape.STAR), (Colour.BLUE, Shape.CIRCLE)})
    config = SceneConfig(holdout=holdout)
    drawn = set()
    for _, meta in _samples(300, size=64, config=config):
        drawn |= {(Colour(o["colour"]), Shape(o["shape"])) for o in meta["scene"]["objects"]}
    assert not drawn & holdout and len(drawn) >= 40
    generate_dataset(tmp_path, 2, size=48, workers=1, progress=False, config=config)
    seen = dataset_seen_pairs(tmp_path)
    assert len(seen) == 46 and not seen & holdout


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="max_objects"):
        SceneConfig(min_objects=3, max_objects=2)
    with pytest.raises(ConfigError, match="no colour for star"):
        SceneConfig(holdout=frozenset((c, Shape.STAR) for c in Colour))
    with pytest.raises(ConfigError, match="size"):
        generate_dataset("/nonexistent-never-made", 1, size=8, progress=False)


def test_palette_colours_are_far_apart_and_far_from_backgrounds():
    def lab(rgb):
        return srgb_to_lab(np.array(rgb, np.float32)) * LAB_WEIGHTS

    colours = [lab(v) for v in PALETTE.values()]
    pair_gap = min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2))
    background_gap = min(np.linalg.norm(c - lab(b)) for c in colours for b in BACKGROUNDS.values())
    assert pair_gap >= 35 and background_gap >= 40


def test_scene_captions_cover_single_object_scenes():
    rng = np.random.default_rng(5)
    scene = sample_scene(rng, 64, SceneConfig(max_objects=1))
    captions = scene_captions(scene, rng)
    assert set(captions) == {"full", "shapes"}


def test_generation_is_fast():
    config = SceneConfig()
    make_sample(0, 256, 0, config)
    start = time.perf_counter()
    for i in range(200):
        make_sample(i, 256, 0, config)
    assert time.perf_counter() - start < 5.0  # about 0.5 s on one core
