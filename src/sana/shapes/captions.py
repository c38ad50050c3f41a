"""Captions of shape scenes: a small grammar that the generator writes and `parse_caption` reads back, and the
claims a caption makes about a scene.

    caption := [PREFIX] body [" on a " BACKGROUND " background"]
    body    := phrase | phrase (", " phrase)* " and " phrase | phrase " " RELATION " " phrase
    phrase  := COUNT [SIZE] [COLOUR] SHAPE["s"]       COUNT: a / an / one, or two ... eight with the plural

A phrase claims that the scene holds exactly COUNT objects with the phrase's attributes; a relation claims that
each phrase is one object and that the first is clearly RELATION the second (`scene.clear_relation`); a
background claims the background's name.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from sana.shapes.scene import (
    BACKGROUNDS,
    GRADIENT,
    Background,
    Colour,
    ObjectSpec,
    Relation,
    Scene,
    SceneConfig,
    SceneObject,
    Shape,
    Size,
    clear_relation,
    scene_from_specs,
)

_RENDER_DOMAIN = 0x5CE7E  # the first word of the seeds of `scene_for_caption`

NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
PREFIXES = (
    "a photo of ",
    "an image of ",
    "a picture of ",
    "a drawing of ",
    "a simple drawing of ",
    "a flat illustration of ",
)
RELATION_WORDS: dict[Relation, tuple[str, ...]] = {
    Relation.LEFT_OF: ("left of", "to the left of", "on the left of"),
    Relation.RIGHT_OF: ("right of", "to the right of", "on the right of"),
    Relation.ABOVE: ("above",),
    Relation.BELOW: ("below", "beneath"),
}
_WORD_TO_RELATION = {w: r for r, words in RELATION_WORDS.items() for w in words}
_RELATION_RE = re.compile(" (" + "|".join(sorted(map(re.escape, _WORD_TO_RELATION), key=len, reverse=True)) + ") ")
_PHRASE_RE = re.compile(
    rf"(a|an|{'|'.join(NUMBERS)}) (?:({'|'.join(s.value for s in Size)}) )?"
    rf"(?:({'|'.join(c.value for c in Colour)}) )?({'|'.join(s.value for s in Shape)})(s?)"
)
_BACKGROUND_RE = re.compile(rf"(.*) on an? ({'|'.join(map(re.escape, [*BACKGROUNDS, GRADIENT]))}) background")


@dataclass(frozen=True)
class Phrase:
    """`count` objects of `shape` (and `colour`, `size` when given)."""

    count: int
    shape: Shape
    colour: Colour | None = None
    size: Size | None = None

    def __post_init__(self):
        if not 1 <= self.count <= len(NUMBERS):
            raise ValueError(f"phrase count must be in [1, {len(NUMBERS)}], got {self.count}")

    def matches(self, obj: SceneObject) -> bool:
        return (
            obj.shape is self.shape
            and (self.colour is None or obj.colour is self.colour)
            and (self.size is None or obj.size is self.size)
        )


@dataclass(frozen=True)
class Caption:
    """What a caption says: phrases, an optional relation between its two phrases, an optional background."""

    phrases: tuple[Phrase, ...]
    relation: Relation | None = None
    background: str | None = None

    def __post_init__(self):
        if not self.phrases:
            raise ValueError("a caption needs at least one phrase")
        if self.relation is not None and (len(self.phrases) != 2 or any(p.count != 1 for p in self.phrases)):
            raise ValueError(f"a relation needs exactly two single-object phrases, got {self.phrases}")
        if self.background is not None and self.background not in (*BACKGROUNDS, GRADIENT):
            raise ValueError(f"unknown background {self.background!r}")


# ----------------------------------------------------------------------------------------------------------
# Writing and reading


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase_text(phrase: Phrase, rng: np.random.Generator | None = None) -> str:
    words = [w.value for w in (phrase.size, phrase.colour) if w is not None]
    noun = phrase.shape.value + ("s" if phrase.count > 1 else "")
    if phrase.count > 1:
        count = NUMBERS[phrase.count - 1]
    else:
        count = "one" if rng is not None and rng.random() < 0.15 else _article((words or [noun])[0])
    return " ".join([count, *words, noun])


def caption_text(caption: Caption, rng: np.random.Generator | None = None) -> str:
    """The caption in words: plain with rng=None, else with a random prefix and phrasing."""
    parts = [phrase_text(p, rng) for p in caption.phrases]
    if caption.relation is not None:
        words = RELATION_WORDS[caption.relation]
        body = f"{parts[0]} {words[int(rng.integers(len(words)))] if rng is not None else words[0]} {parts[1]}"
    elif len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng is not None and rng.random() < 0.5:
        body = PREFIXES[int(rng.integers(len(PREFIXES)))] + body
    if caption.background is not None:
        body += f" on {_article(caption.background)} {caption.background} background"
    return body


def _parse_phrase(text: str, caption: str) -> Phrase:
    m = _PHRASE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"cannot read {text!r} in caption {caption!r}")
    count_word, size, colour, shape, plural = m.groups()
    count = 1 if count_word in ("a", "an") else NUMBERS.index(count_word) + 1
    if (count > 1) != bool(plural):
        raise ValueError(f"count and noun disagree in {text!r} of caption {caption!r}")
    return Phrase(count, Shape(shape), colour and Colour(colour), size and Size(size))


def parse_caption(text: str) -> Caption:
    """Read a caption written in this module's grammar; raises ValueError naming what cannot be read."""
    body = text.strip().lower().rstrip(".")
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    background = None
    m = _BACKGROUND_RE.fullmatch(body)
    if m is not None:
        body, background = m.groups()
    m = _RELATION_RE.search(body)
    if m is not None:
        first, second = body[: m.start()], body[m.end() :]
        phrases = (_parse_phrase(first, text), _parse_phrase(second, text))
        if any(p.count != 1 for p in phrases):
            raise ValueError(f"a relation needs one object on each side in caption {text!r}")
        return Caption(phrases, _WORD_TO_RELATION[m.group(1)], background)
    parts = re.split(r",? and |, ", body)
    return Caption(tuple(_parse_phrase(p, text) for p in parts), None, background)


# ----------------------------------------------------------------------------------------------------------
# Claims


def check_caption(caption: Caption, scene: Scene) -> list[str]:
    """The claims of `caption` that `scene` contradicts (empty when the caption is true of the scene)."""
    wrong = []
    for phrase in caption.phrases:
        found = sum(phrase.matches(o) for o in scene.objects)
        if found != phrase.count:
            wrong.append(f"{phrase_text(phrase)!r}: the scene has {found}")
    if caption.relation is not None and not wrong:
        a, b = (next(o for o in scene.objects if p.matches(o)) for p in caption.phrases)
        actual = clear_relation(a.centre, b.centre, scene.size)
        if actual is not caption.relation:
            wrong.append(f"relation {caption.relation.value!r}: the scene has {actual and actual.value!r}")
    if caption.background is not None and caption.background != scene.background.name:
        wrong.append(f"background {caption.background!r}: the scene has {scene.background.name!r}")
    return wrong


def _grouped(objects: tuple[SceneObject, ...], with_colour: bool, with_size: bool) -> list[Phrase]:
    """One phrase per distinct (colour,) shape, in order of first appearance; the size only when all agree."""
    counts = Counter((o.colour if with_colour else None, o.shape) for o in objects)
    sizes: dict[tuple, set[Size]] = {}
    for o in objects:
        sizes.setdefault((o.colour if with_colour else None, o.shape), set()).add(o.size)
    phrases = []
    for (colour, shape), n in counts.items():
        (size,) = sizes[(colour, shape)] if with_size and len(sizes[(colour, shape)]) == 1 else (None,)
        phrases.append(Phrase(n, shape, colour, size))
    return phrases


def _shuffled(items: list, rng: np.random.Generator) -> tuple:
    return tuple(items[i] for i in rng.permutation(len(items)))


def scene_captions(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Several true captions of `scene`, by name: "full" (every object, with colours), "shapes" (every object,
    shapes only), and when the scene allows them "object" (one kind of object), "count" (a kind of which there are
    several) and "relation" (two objects, each the only one of its description, in a clear relation)."""
    objects = scene.objects
    if not objects:
        raise ValueError("a scene without objects has no caption")
    background = scene.background.name if rng.random() < 0.3 else None
    full = _grouped(objects, with_colour=True, with_size=rng.random() < 0.3)
    by_shape = _grouped(objects, with_colour=False, with_size=False)
    captions = {
        "full": caption_text(Caption(_shuffled(full, rng), None, background), rng),
        "shapes": caption_text(Caption(_shuffled(by_shape, rng)), rng),
    }
    if len(full) > 1:
        captions["object"] = caption_text(Caption((full[int(rng.integers(len(full)))],)), rng)
    several = [p for p in _grouped(objects, True, False) + by_shape if p.count > 1]
    if several:
        captions["count"] = caption_text(Caption((several[int(rng.integers(len(several)))],)), rng)

    # Relations between objects that a phrase picks out alone: by colour and shape, or by shape.
    pairs = Counter((o.colour, o.shape) for o in objects)
    shapes = Counter(o.shape for o in objects)

    def descriptions(o: SceneObject) -> list[Phrase]:
        found = [Phrase(1, o.shape, o.colour)] if pairs[(o.colour, o.shape)] == 1 else []
        return found + ([Phrase(1, o.shape)] if shapes[o.shape] == 1 else [])

    candidates = []
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            relation = clear_relation(a.centre, b.centre, scene.size)
            if relation is not None and descriptions(a) and descriptions(b):
                candidates.append((a, b, relation))
    if candidates:
        a, b, relation = candidates[int(rng.integers(len(candidates)))]
        if rng.random() < 0.5:
            a, b, relation = b, a, relation.inverse()
        # Both phrases with colour, or both without, so that the phrasing stays parallel when it can.
        da, db = descriptions(a), descriptions(b)
        with_colour = rng.random() < 0.7
        pa = next((p for p in da if (p.colour is not None) == with_colour), da[0])
        pb = next((p for p in db if (p.colour is not None) == with_colour), db[0])
        captions["relation"] = caption_text(Caption((pa, pb), relation), rng)
    return captions


def scene_for_caption(caption: Caption, size: int, seed: int, config: SceneConfig | None = None) -> Scene:
    """A scene of which `caption` is true, objects apart (see `scene.scene_from_specs`): what a perfect
    text-to-image model would draw. Raises ValueError for a caption no scene satisfies."""
    rng = np.random.default_rng(np.random.SeedSequence([_RENDER_DOMAIN, seed]))
    specs = [ObjectSpec(p.shape, p.colour, p.size) for p in caption.phrases for _ in range(p.count)]
    relation = (0, caption.phrases[0].count, caption.relation) if caption.relation is not None else None
    for _ in range(8):  # free colours may collide with another phrase (a circle + a red circle): draw again
        scene = scene_from_specs(rng, size, specs, relation, config)
        if caption.background is not None and caption.background != GRADIENT:
            rgb = BACKGROUNDS[caption.background]
            scene = Scene(size, Background(caption.background, rgb, rgb), scene.objects)
        elif caption.background == GRADIENT and scene.background.name != GRADIENT:
            scene = Scene(size, Background(GRADIENT, BACKGROUNDS["white"], BACKGROUNDS["grey"], 90.0), scene.objects)
        if not check_caption(caption, scene):
            return scene
    raise ValueError(f"no scene satisfies {caption_text(caption)!r}: {'; '.join(check_caption(caption, scene))}")
