"""ShapesEval: the classical scorer is right on ground-truth scenes, rejects wrong ones, survives mild noise and
blur; prompts are deterministic and balanced; the report's novel-pair accuracy; connected components."""

from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sana.shapes import (
    Category,
    Colour,
    EvalPrompt,
    Shape,
    detect_objects,
    make_eval_prompts,
    parse_caption,
    pipeline_generate_fn,
    render,
    render_prompts,
    scene_for_caption,
    score_image,
    self_check,
)
from sana.shapes.evaluate import evaluate
from sana.shapes.scene import ObjectSpec, SceneConfig, Size, scene_from_specs
from sana.shapes.vision import label_components


def test_self_check_scores_ground_truth_scenes():
    report = self_check(n=300, seed=11)
    assert report.overall >= 0.98, report.summary()
    assert min(report.accuracy.values()) >= 0.95, report.summary()
    assert set(report.accuracy) == {c.value for c in Category}


@pytest.mark.parametrize("size", [128, 512])
def test_self_check_at_other_sizes(size):
    assert self_check(n=60, seed=2, size=size).overall >= 0.95


def test_prompts_are_deterministic_balanced_and_parse_back():
    prompts = make_eval_prompts(120, seed=3)
    assert prompts == make_eval_prompts(120, seed=3)
    assert prompts[:30] == make_eval_prompts(30, seed=3)
    assert [p.text for p in prompts] != [p.text for p in make_eval_prompts(120, seed=4)]
    for category in Category:
        assert sum(p.category is category for p in prompts) == 20
    for p in prompts:
        assert parse_caption(p.text) == p.caption
        assert EvalPrompt.from_text(p.text).category is p.category
    counts = {p.caption.phrases[0].count for p in prompts if p.category is Category.COUNTING}
    assert counts == {2, 3, 4}
    assert all(p.pairs for p in prompts if p.category in (Category.COLORS, Category.COLOR_ATTR))
    assert not any(p.pairs for p in prompts if p.category not in (Category.COLORS, Category.COLOR_ATTR))


def _image(text, seed, size=256):
    return render(scene_for_caption(parse_caption(text), size, seed))


@pytest.mark.parametrize(
    "drawn, wrong",
    [
        ("a red circle", "a blue circle"),
        ("a red circle", "a red square"),
        ("two stars", "three stars"),
        ("four triangles", "three triangles"),
        ("a triangle left of a ring", "a triangle right of a ring"),
        ("a star above a hexagon", "a star below a hexagon"),
        ("a square", "a circle"),
        ("a hexagon", "a circle"),
        ("a ring", "a circle"),
        ("a triangle", "a star"),
        ("a red star and a blue ring", "a blue star and a red ring"),
        ("a green square and a yellow triangle", "a green square and a yellow star"),
    ],
)
def test_wrong_scenes_are_rejected(drawn, wrong):
    for seed in range(4):
        image = _image(drawn, seed)
        right_ok, details = score_image(image, EvalPrompt.from_text(drawn))
        wrong_ok, wrong_details = score_image(image, EvalPrompt.from_text(wrong))
        assert right_ok, details
        assert not wrong_ok and wrong_details["reason"], (drawn, wrong, seed)


def test_blank_and_noise_images_are_rejected():
    rng = np.random.default_rng(0)
    for image in (Image.new("RGB", (256, 256), "white"), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)):
        for text in ("a circle", "a red star", "two squares"):
            assert not score_image(image, EvalPrompt.from_text(text))[0]


def test_scoring_survives_mild_noise_and_blur():
    rng = np.random.default_rng(0)

    def noisy(prompts, seeds):
        out = []
        for image in render_prompts(prompts, seeds):
            image = image.filter(ImageFilter.GaussianBlur(1.0))
            pixels = np.asarray(image, np.float32) + rng.normal(0.0, 6.0, (256, 256, 3))
            out.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        return out

    report = evaluate(noisy, n=120, seed=5)
    assert report.overall >= 0.95, report.summary()


def test_float_images_and_large_images_are_accepted():
    image = _image("a yellow hexagon left of a pink star", 0, size=512)
    prompt = EvalPrompt.from_text("a yellow hexagon left of a pink star")
    assert score_image(np.asarray(image, np.float32) / 255.0, prompt)[0]
    assert score_image(image, prompt)[0]
    with pytest.raises(ValueError, match="H, W, 3"):
        score_image(np.zeros((8, 8)), prompt)


def test_report_separates_novel_pairs(tmp_path):
    seen = {(c, s) for c in Colour for s in Shape if c is not Colour.RED}

    def blind_to_red(prompts, seeds):  # a model that never learnt red: it draws nothing for those prompts
        images = render_prompts(prompts, seeds)
        blank = Image.new("RGB", (256, 256), "white")
        return [blank if "red" in p else im for p, im in zip(prompts, images, strict=True)]

    report = evaluate(blind_to_red, n=120, seed=1, seen_pairs=seen, image_dir=tmp_path)
    novel = [r for r in report.results if r.novel]
    assert report.novel_count == len(novel) > 0
    assert all("red" in r.prompt.text for r in novel)
    assert report.novel_accuracy == 0.0
    assert report.accuracy["single_object"] == 1.0 and report.accuracy["colors"] < 1.0
    assert len(list(tmp_path.glob("*.png"))) == 120
    assert report.to_dict()["results"][0]["text"] == report.results[0].prompt.text
    assert evaluate(blind_to_red, n=12, seed=1).novel_accuracy is None


def test_generate_fn_must_return_one_image_per_prompt():
    with pytest.raises(ValueError, match="returned 1 image"):
        evaluate(lambda prompts, seeds: render_prompts(prompts[:1], seeds[:1]), n=6, batch_size=3)


def test_detections_on_a_crowded_scene():
    specs = [ObjectSpec(s, c, Size.SMALL) for s, c in zip(Shape, Colour, strict=False)]
    scene = scene_from_specs(np.random.default_rng(4), 256, specs, config=SceneConfig(gap=0.012, max_overlap=0.0))
    found = sorted((d.colour, d.shape) for d in detect_objects(render(scene)))
    assert found == sorted((o.colour, o.shape) for o in scene.objects)


def _flood_fill_count(classes):
    """Reference: the number of 4-connected components of equal non-negative values, by breadth-first search."""
    h, w = classes.shape
    seen = np.zeros((h, w), bool)
    count = 0
    for y in range(h):
        for x in range(w):
            if classes[y, x] < 0 or seen[y, x]:
                continue
            count += 1
            queue = deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and classes[ny, nx] == classes[cy, cx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(1, 24, size=2)
        classes = rng.integers(-1, 1 + trial % 3, size=(h, w))
        labels, count = label_components(classes)
        assert count == _flood_fill_count(classes)
        assert (labels == 0).sum() == (classes < 0).sum()
        for k in range(1, count + 1):  # one value per label
            assert len(np.unique(classes[labels == k])) == 1
    spiral = -np.ones((9, 9), int)  # a spiral is one component however it winds
    spiral[0, :], spiral[:, 8], spiral[8, :], spiral[2:, 0], spiral[2, :7], spiral[2:7, 6], spiral[6, 2:7] = (
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    assert label_components(spiral)[1] == 1


def test_pipeline_generate_fn_calls_once_per_prompt_with_its_seed():
    calls = []

    def fake_pipeline(prompt, **kwargs):
        calls.append((prompt, kwargs))
        return [render_prompts([prompt], [kwargs["seed"]])[0]]

    generate = pipeline_generate_fn(fake_pipeline, size=256, steps=4)
    report = evaluate(generate, n=6, seed=0, batch_size=4)
    prompts = make_eval_prompts(6, seed=0)
    assert [c[0] for c in calls] == [p.text for p in prompts]
    assert [c[1]["seed"] for c in calls] == [p.seed for p in prompts]
    assert all(c[1]["steps"] == 4 and c[1]["height"] == c[1]["width"] == 256 for c in calls)
    assert report.overall == 1.0
