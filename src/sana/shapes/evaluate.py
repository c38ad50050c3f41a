"""ShapesEval: GenEval's six categories on shape prompts, scored by classical image analysis (`shapes.vision`).

Categories and what makes an image correct (detections are objects of a palette colour with a recognised shape):

    single_object  "a star"                            at least one star
    two_object     "a star and a ring"                 at least one of each
    counting       "three stars"                       exactly three stars
    colors         "a red star"                        at least one red star
    position       "a star left of a ring"             some star is left of some ring (`scene.relation_holds`)
    color_attr     "a red star and a blue ring"        at least one red star and one blue ring

The overall score is the mean of the six category accuracies. Prompts are drawn from (seed, index) in a stream
of their own, disjoint from the training generator's. A prompt is "novel" for a training set when one of its
(colour, shape) pairs never appears in that set; the report gives the accuracy on those prompts separately.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sana.shapes.captions import Caption, Phrase, caption_text, parse_caption, scene_for_caption
from sana.shapes.scene import Colour, Relation, Shape, relation_holds, render
from sana.shapes.vision import DetectorConfig, detect_objects, to_rgb_array

_EVAL_DOMAIN = 0xE7A1  # the first word of every evaluation seed; the training generator uses another

ImageLike = Image.Image | np.ndarray
# generate_fn(prompts, seeds) -> one image per prompt (PIL, or an (H, W, 3) uint8 / float-in-[0, 1] array)
GenerateFn = Callable[[Sequence[str], Sequence[int]], Sequence[ImageLike]]


class Category(str, enum.Enum):
    SINGLE_OBJECT = "single_object"
    TWO_OBJECT = "two_object"
    COUNTING = "counting"
    COLORS = "colors"
    POSITION = "position"
    COLOR_ATTR = "color_attr"


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt: its text, what it asks for (`caption`) and the seed its image should be drawn with."""

    index: int
    category: Category
    text: str
    caption: Caption
    seed: int

    @property
    def pairs(self) -> frozenset[tuple[Colour, Shape]]:
        """The (colour, shape) pairs the prompt names."""
        return frozenset((p.colour, p.shape) for p in self.caption.phrases if p.colour is not None)

    @classmethod
    def from_text(cls, text: str, seed: int = 0, index: int = 0) -> EvalPrompt:
        """A prompt from any caption of the shapes grammar, its category read from what it asks for."""
        caption = parse_caption(text)
        phrases = caption.phrases
        if caption.relation is not None:
            category = Category.POSITION
        elif any(p.count > 1 for p in phrases):
            category = Category.COUNTING
        elif len(phrases) > 1:
            category = Category.COLOR_ATTR if any(p.colour for p in phrases) else Category.TWO_OBJECT
        else:
            category = Category.COLORS if phrases[0].colour else Category.SINGLE_OBJECT
        return cls(index, category, text, caption, seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "category": self.category.value,
            "text": self.text,
            "seed": self.seed,
            "objects": [
                {"count": p.count, "shape": p.shape.value, "colour": p.colour and p.colour.value}
                for p in self.caption.phrases
            ],
            "relation": self.caption.relation and self.caption.relation.value,
        }


def _prompt_caption(category: Category, rng: np.random.Generator) -> Caption:
    shapes = [Shape(s) for s in rng.permutation([s.value for s in Shape])]
    colours = [Colour(c) for c in rng.permutation([c.value for c in Colour])]
    if category is Category.SINGLE_OBJECT:
        return Caption((Phrase(1, shapes[0]),))
    if category is Category.TWO_OBJECT:
        return Caption((Phrase(1, shapes[0]), Phrase(1, shapes[1])))
    if category is Category.COUNTING:
        return Caption((Phrase(int(rng.integers(2, 5)), shapes[0]),))
    if category is Category.COLORS:
        return Caption((Phrase(1, shapes[0], colours[0]),))
    if category is Category.POSITION:
        relation = list(Relation)[int(rng.integers(len(Relation)))]
        return Caption((Phrase(1, shapes[0]), Phrase(1, shapes[1])), relation)
    if category is Category.COLOR_ATTR:
        return Caption((Phrase(1, shapes[0], colours[0]), Phrase(1, shapes[1], colours[1])))
    raise ValueError(f"unknown category {category!r}")


def make_eval_prompts(n: int, seed: int = 0) -> list[EvalPrompt]:
    """`n` prompts, the categories in turn (so each has n / 6 of them), each drawn from (seed, index)."""
    if n < 1 or seed < 0:
        raise ValueError(f"need n >= 1 and seed >= 0, got n={n}, seed={seed}")
    categories = list(Category)
    prompts = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([_EVAL_DOMAIN, seed, i]))
        category = categories[i % len(categories)]
        caption = _prompt_caption(category, rng)
        prompts.append(EvalPrompt(i, category, caption_text(caption), caption, int(rng.integers(2**31))))
    return prompts


# ----------------------------------------------------------------------------------------------------------
# Scoring


def score_image(
    image: ImageLike, prompt: EvalPrompt, config: DetectorConfig | None = None
) -> tuple[bool, dict[str, Any]]:
    """Whether `image` shows what `prompt` asks for (see the module docstring), and the evidence: detections,
    how many objects matched each phrase, and the reason for a failure."""
    rgb = to_rgb_array(image)
    found_all = detect_objects(rgb, config)
    detections = [d for d in found_all if d.shape is not None]
    side = max(rgb.shape[:2])
    exact = prompt.category is Category.COUNTING
    matches = [
        [d for d in detections if d.shape is p.shape and (p.colour is None or d.colour is p.colour)]
        for p in prompt.caption.phrases
    ]
    reasons = []
    for phrase, found in zip(prompt.caption.phrases, matches, strict=True):
        if (len(found) != phrase.count) if exact else (len(found) < phrase.count):
            want = f"{'exactly' if exact else 'at least'} {phrase.count}"
            reasons.append(
                f"{want} {(phrase.colour.value + ' ') if phrase.colour else ''}{phrase.shape.value}, found {len(found)}"
            )
    relation = prompt.caption.relation
    if relation is not None and not reasons:
        if not any(relation_holds(relation, a.centre, b.centre, side) for a in matches[0] for b in matches[1]):
            reasons.append(
                f"no {prompt.caption.phrases[0].shape.value} {relation.value} a {prompt.caption.phrases[1].shape.value}"
            )
    details = {
        "detections": [d.to_dict() for d in found_all],
        "found": [len(m) for m in matches],
        "reason": "; ".join(reasons),
    }
    return not reasons, details


@dataclass(frozen=True)
class PromptResult:
    prompt: EvalPrompt
    correct: bool
    novel: bool
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.prompt.to_dict(), "correct": self.correct, "novel": self.novel, **self.details}


@dataclass(frozen=True)
class EvalReport:
    """Per-category accuracy, their mean (`overall`), and the accuracy on novel prompts (None without any, or
    when no seen pairs were given)."""

    n: int
    seed: int
    accuracy: dict[str, float]
    overall: float
    novel_accuracy: float | None
    novel_count: int
    results: tuple[PromptResult, ...]

    def to_dict(self, with_results: bool = True) -> dict[str, Any]:
        d = {
            "n": self.n,
            "seed": self.seed,
            "overall": self.overall,
            "accuracy": dict(self.accuracy),
            "novel_accuracy": self.novel_accuracy,
            "novel_count": self.novel_count,
        }
        if with_results:
            d["results"] = [r.to_dict() for r in self.results]
        return d

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [f"ShapesEval overall {self.overall:.4f} ({self.n} prompts, seed {self.seed})"]
        lines += [f"  {name:<14} {acc:.4f}" for name, acc in self.accuracy.items()]
        if self.novel_accuracy is not None:
            lines.append(f"  {'novel pairs':<14} {self.novel_accuracy:.4f} ({self.novel_count} prompts)")
        return "\n".join(lines)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate(
    generate_fn: GenerateFn,
    n: int = 600,
    seed: int = 0,
    seen_pairs: Iterable[tuple[Colour, Shape]] | None = None,
    batch_size: int = 8,
    config: DetectorConfig | None = None,
    image_dir: str | Path | None = None,
    progress: bool = False,
) -> EvalReport:
    """Run ShapesEval on `generate_fn` (prompts, seeds) -> images; `seen_pairs` are the (colour, shape) pairs of
    the training set (see `generate.dataset_seen_pairs`). With `image_dir`, images are saved there as
    NNNNN.png."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = make_eval_prompts(n, seed)
    seen = None if seen_pairs is None else frozenset(seen_pairs)
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    results = []
    bar = _progress(n, progress)
    for batch in _batches(prompts, batch_size):
        images = list(generate_fn([p.text for p in batch], [p.seed for p in batch]))
        if len(images) != len(batch):
            raise ValueError(f"generate_fn returned {len(images)} image(s) for {len(batch)} prompt(s)")
        for prompt, image in zip(batch, images, strict=True):
            if image_dir is not None:
                Image.fromarray(to_rgb_array(image)).save(Path(image_dir) / f"{prompt.index:05d}.png")
            correct, details = score_image(image, prompt, config)
            novel = seen is not None and bool(prompt.pairs) and not prompt.pairs <= seen
            results.append(PromptResult(prompt, correct, novel, details))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    accuracy = {}
    for category in Category:
        scored = [r.correct for r in results if r.prompt.category is category]
        if scored:
            accuracy[category.value] = float(np.mean(scored))
    novel = [r.correct for r in results if r.novel]
    return EvalReport(
        n=n,
        seed=seed,
        accuracy=accuracy,
        overall=float(np.mean(list(accuracy.values()))),
        novel_accuracy=float(np.mean(novel)) if novel else None,
        novel_count=len(novel),
        results=tuple(results),
    )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="image", desc="ShapesEval")


def pipeline_generate_fn(
    pipeline: Callable[..., list[Image.Image]],
    size: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> GenerateFn:
    """A `GenerateFn` over a `sana.Pipeline`: one call per prompt with that prompt's seed, so that an image does not
    depend on which prompts share its batch."""

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        return [
            pipeline(p, height=size, width=size, steps=steps, guidance=guidance, seed=s, progress=False)[0]
            for p, s in zip(prompts, seeds, strict=True)
        ]

    return generate


def render_prompts(prompts: Sequence[str], seeds: Sequence[int], size: int = 256) -> list[Image.Image]:
    """A `GenerateFn` that draws, for each prompt, a scene of which it is true: the ground truth."""
    return [render(scene_for_caption(parse_caption(p), size, s)) for p, s in zip(prompts, seeds, strict=True)]


def self_check(n: int = 300, seed: int = 0, size: int = 256, config: DetectorConfig | None = None) -> EvalReport:
    """ShapesEval on ground-truth renders of its own prompts: the scorer's accuracy, which should be >= 0.98."""
    return evaluate(lambda prompts, seeds: render_prompts(prompts, seeds, size), n, seed, config=config)
