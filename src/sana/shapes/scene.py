"""Scenes of flat shapes: the vocabulary (shapes, colours, sizes, backgrounds, relations), scene sampling with
limited overlap, and rendering with supersampled anti-aliasing.

Every random choice is drawn from a numpy Generator passed in, in a fixed order, so a scene is a pure function of
its seed. Coordinates are pixels with (0, 0) the top-left corner of the image and y pointing down; a pixel (i, j)
covers [i, i + 1) x [j, j + 1).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sana.errors import ConfigError

RGB = tuple[int, int, int]


class Shape(str, enum.Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"
    STAR = "star"
    HEXAGON = "hexagon"
    RING = "ring"


class Colour(str, enum.Enum):
    RED = "red"
    ORANGE = "orange"
    YELLOW = "yellow"
    GREEN = "green"
    CYAN = "cyan"
    BLUE = "blue"
    PURPLE = "purple"
    PINK = "pink"


class Size(str, enum.Enum):
    SMALL = "small"
    LARGE = "large"


class Relation(str, enum.Enum):
    LEFT_OF = "left of"
    RIGHT_OF = "right of"
    ABOVE = "above"
    BELOW = "below"

    def inverse(self) -> Relation:
        return _INVERSE[self]


_INVERSE = {
    Relation.LEFT_OF: Relation.RIGHT_OF,
    Relation.RIGHT_OF: Relation.LEFT_OF,
    Relation.ABOVE: Relation.BELOW,
    Relation.BELOW: Relation.ABOVE,
}

# Saturated colours, at least 35 apart in Lab (lightness weighted by 1/2) from each other and 40 from every
# background below; chosen so that nearest-colour classification cannot confuse them.
PALETTE: dict[Colour, RGB] = {
    Colour.RED: (225, 25, 30),
    Colour.ORANGE: (255, 130, 0),
    Colour.YELLOW: (255, 220, 0),
    Colour.GREEN: (20, 165, 50),
    Colour.CYAN: (0, 210, 230),
    Colour.BLUE: (25, 70, 235),
    Colour.PURPLE: (140, 30, 170),
    Colour.PINK: (255, 120, 205),
}

# Near-grey backgrounds (Lab chroma below 10); a gradient runs between two of them.
BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "cream": (250, 248, 240),
    "beige": (242, 236, 222),
    "light grey": (225, 225, 225),
    "grey": (150, 150, 150),
    "slate": (70, 76, 88),
    "dark grey": (60, 60, 64),
    "black": (20, 20, 20),
}
GRADIENT = "gradient"

# Circumradius of each shape relative to the radius drawn for its size, so that shapes of one size look alike.
SHAPE_SCALE: dict[Shape, float] = {
    Shape.CIRCLE: 1.0,
    Shape.RING: 1.0,
    Shape.SQUARE: 1.15,
    Shape.TRIANGLE: 1.3,
    Shape.HEXAGON: 1.05,
    Shape.STAR: 1.3,
}
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
RING_INNER = 0.55  # hole radius / outer radius
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Background:
    """A flat colour (start == end) or a linear gradient from `start` to `end` along direction `angle` (degrees,
    0 = left to right, 90 = top to bottom), spanning the whole image."""

    name: str  # a key of BACKGROUNDS, or GRADIENT
    start: RGB
    end: RGB
    angle: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start": list(self.start), "end": list(self.end), "angle": self.angle}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Background:
        return cls(d["name"], tuple(d["start"]), tuple(d["end"]), float(d["angle"]))


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. `radius` is the circumradius in pixels, `centre` its centre (and centroid), `bbox` the
    (x0, y0, x1, y1) extent of its outline, `rgb` the colour actually drawn (the palette colour, jittered)."""

    shape: Shape
    colour: Colour
    size: Size
    centre: tuple[float, float]
    radius: float
    rotation: float  # degrees, counter-clockwise on screen
    bbox: tuple[float, float, float, float]
    rgb: RGB

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape.value,
            "colour": self.colour.value,
            "size": self.size.value,
            "centre": list(self.centre),
            "radius": self.radius,
            "rotation": self.rotation,
            "bbox": list(self.bbox),
            "rgb": list(self.rgb),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneObject:
        return cls(
            Shape(d["shape"]),
            Colour(d["colour"]),
            Size(d["size"]),
            tuple(d["centre"]),
            float(d["radius"]),
            float(d["rotation"]),
            tuple(d["bbox"]),
            tuple(d["rgb"]),
        )


@dataclass(frozen=True)
class Scene:
    """A square image of side `size`: a background and objects drawn in order (later ones on top)."""

    size: int
    background: Background
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "background": self.background.to_dict(),
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            int(d["size"]), Background.from_dict(d["background"]), tuple(SceneObject.from_dict(o) for o in d["objects"])
        )


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are sampled. Radii are fractions of the image side (before SHAPE_SCALE)."""

    min_objects: int = 1
    max_objects: int = 4
    small_radius: tuple[float, float] = (0.055, 0.075)
    large_radius: tuple[float, float] = (0.11, 0.15)
    max_overlap: float = 0.08  # the most of an object's footprint that later objects may cover
    gap: float = 0.0  # smallest distance between two objects' footprints, as a fraction of the side
    same_colour_gap: float = 0.012  # the same between objects of one colour, so that they stay countable
    colour_jitter: int = 10  # each channel of a drawn colour is moved by at most this much
    repeat_probability: float = 0.4  # chance that an object repeats the previous object's shape
    gradient_probability: float = 0.35
    holdout: frozenset[tuple[Colour, Shape]] = field(default_factory=frozenset)  # pairs never drawn

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ConfigError(f"need 1 <= min_objects <= max_objects <= 8, got {self.min_objects}, {self.max_objects}")
        for name in ("small_radius", "large_radius"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 0.25:
                raise ConfigError(f"{name} must satisfy 0 < low <= high < 0.25, got {(lo, hi)}")
        if not 0 <= self.max_overlap < 0.5:
            raise ConfigError(f"max_overlap must be in [0, 0.5), got {self.max_overlap}")
        if not 0 <= self.gap < 0.1 or not 0 <= self.same_colour_gap < 0.1:
            raise ConfigError(f"gaps must be in [0, 0.1), got {self.gap}, {self.same_colour_gap}")
        if not 0 <= self.colour_jitter <= 16:
            raise ConfigError(f"colour_jitter must be in [0, 16], got {self.colour_jitter}")
        for colour, shape in self.holdout:
            if not isinstance(colour, Colour) or not isinstance(shape, Shape):
                raise ConfigError(f"holdout pairs must be (Colour, Shape), got {(colour, shape)!r}")
        for shape in Shape:
            if all((c, shape) in self.holdout for c in Colour):
                raise ConfigError(f"holdout leaves no colour for {shape.value}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["small_radius"], d["large_radius"] = list(self.small_radius), list(self.large_radius)
        d["holdout"] = holdout_to_list(self.holdout)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneConfig:
        d = dict(d)
        d["small_radius"], d["large_radius"] = tuple(d["small_radius"]), tuple(d["large_radius"])
        d["holdout"] = holdout_from_list(d["holdout"])
        return cls(**d)


def holdout_to_list(pairs) -> list[list[str]]:
    return sorted([c.value, s.value] for c, s in pairs)


def holdout_from_list(items) -> frozenset[tuple[Colour, Shape]]:
    """Parse [["red", "star"], ...] (or "red star" strings); raises ConfigError naming a bad item."""
    pairs = set()
    for item in items:
        parts = item.split() if isinstance(item, str) else list(item)
        try:
            colour, shape = parts
            pairs.add((Colour(colour), Shape(shape)))
        except ValueError as e:
            raise ConfigError(f"holdout pair {item!r} is not (colour, shape): {e}") from e
    return frozenset(pairs)


# ----------------------------------------------------------------------------------------------------------
# Geometry


def outline(shape: Shape, centre: tuple[float, float], radius: float, rotation: float) -> list[tuple[float, float]]:
    """The polygon of a polygonal shape (empty for circle and ring), vertices in screen coordinates."""
    cx, cy = centre
    if shape in (Shape.CIRCLE, Shape.RING):
        return []
    corners = {Shape.TRIANGLE: 3, Shape.SQUARE: 4, Shape.HEXAGON: 6, Shape.STAR: 10}[shape]
    # At rotation 0 a triangle, hexagon or star has a vertex straight up and a square is axis-aligned.
    start = math.radians(rotation + (45.0 if shape is Shape.SQUARE else 90.0))
    points = []
    for k in range(corners):
        r = radius * (STAR_INNER if shape is Shape.STAR and k % 2 else 1.0)
        a = start + 2 * math.pi * k / corners
        points.append((cx + r * math.cos(a), cy - r * math.sin(a)))
    return points


def bbox_of(shape: Shape, centre: tuple[float, float], radius: float, rotation: float):
    points = outline(shape, centre, radius, rotation)
    if not points:
        return (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Coverage:
    """An object's anti-aliased coverage (0-255) on the pixel grid, in a crop whose top-left pixel is (x0, y0).
    `footprint` is where it covers anything, with a ring's hole filled (nothing may sit inside a ring)."""

    x0: int
    y0: int
    alpha: np.ndarray  # (h, w) uint8
    footprint: np.ndarray  # (h, w) bool


def coverage(shape: Shape, centre: tuple[float, float], radius: float, rotation: float) -> Coverage:
    """Draw the shape SUPERSAMPLE times larger and average down (box filter)."""
    cx, cy = centre
    x0, y0 = math.floor(cx - radius) - 1, math.floor(cy - radius) - 1
    w, h = math.ceil(cx + radius) + 2 - x0, math.ceil(cy + radius) + 2 - y0
    s = SUPERSAMPLE

    def to_canvas(x: float, y: float) -> tuple[float, float]:  # PIL puts integer coordinates on pixel centres
        return ((x - x0) * s - 0.5, (y - y0) * s - 0.5)

    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    filled = None
    if shape in (Shape.CIRCLE, Shape.RING):
        draw.ellipse([*to_canvas(cx - radius, cy - radius), *to_canvas(cx + radius, cy + radius)], fill=255)
        if shape is Shape.RING:
            filled = np.asarray(canvas.reduce(s)) > 0
            r = radius * RING_INNER
            draw.ellipse([*to_canvas(cx - r, cy - r), *to_canvas(cx + r, cy + r)], fill=0)
    else:
        draw.polygon([to_canvas(x, y) for x, y in outline(shape, centre, radius, rotation)], fill=255)
    alpha = np.asarray(canvas.reduce(s))
    return Coverage(x0, y0, alpha, alpha > 0 if filled is None else filled)


def footprint_overlap(a: Coverage, b: Coverage, grow: int = 0) -> int:
    """Pixels where footprint a, grown by `grow` pixels (a square), meets footprint b."""
    ax0, ay0 = a.x0 - grow, a.y0 - grow
    ah, aw = a.footprint.shape[0] + 2 * grow, a.footprint.shape[1] + 2 * grow
    bh, bw = b.footprint.shape
    x0, y0 = max(ax0, b.x0), max(ay0, b.y0)
    x1, y1 = min(ax0 + aw, b.x0 + bw), min(ay0 + ah, b.y0 + bh)
    if x0 >= x1 or y0 >= y1:
        return 0
    fa = a.footprint
    if grow:
        fa = dilate(np.pad(fa, grow), grow)
    fa = fa[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
    fb = b.footprint[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(fa & fb))


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary dilation by a 3x3 square, `steps` times (pixels outside the array count as empty)."""
    for _ in range(steps):
        out = mask.copy()
        out[1:] |= mask[:-1]
        out[:-1] |= mask[1:]
        row = out.copy()
        out[:, 1:] |= row[:, :-1]
        out[:, :-1] |= row[:, 1:]
        mask = out
    return mask


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary erosion by a 3x3 square (pixels outside the array count as empty)."""
    for _ in range(steps):
        out = mask.copy()
        out[1:] &= mask[:-1]
        out[:-1] &= mask[1:]
        out[0] = out[-1] = False
        row = out.copy()
        out[:, 1:] &= row[:, :-1]
        out[:, :-1] &= row[:, 1:]
        out[:, 0] = out[:, -1] = False
        mask = out
    return mask


# ----------------------------------------------------------------------------------------------------------
# Relations


def clear_relation(a: tuple[float, float], b: tuple[float, float], size: int) -> Relation | None:
    """The relation of centre `a` to centre `b` that captions may state: the two are at least 0.15 * size apart
    along one axis and that offset is at least twice the offset along the other; otherwise none."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 0.15 * size:
        return Relation.LEFT_OF if dx > 0 else Relation.RIGHT_OF
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 0.15 * size:
        return Relation.ABOVE if dy > 0 else Relation.BELOW
    return None


def relation_holds(relation: Relation, a: tuple[float, float], b: tuple[float, float], size: float) -> bool:
    """Whether centre `a` is `relation` centre `b` as ShapesEval judges it (more lenient than clear_relation):
    at least 0.05 * size apart along the relation's axis, and within about 63 degrees of it."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # a left of b: dx > 0; a above b: dy > 0
    along, across = {
        Relation.LEFT_OF: (dx, dy),
        Relation.RIGHT_OF: (-dx, dy),
        Relation.ABOVE: (dy, dx),
        Relation.BELOW: (-dy, dx),
    }[relation]
    return along >= 0.05 * size and along >= 0.5 * abs(across)


# ----------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class ObjectSpec:
    """What a scene must contain, one object: unset fields are drawn at random."""

    shape: Shape
    colour: Colour | None = None
    size: Size | None = None


def sample_background(rng: np.random.Generator, config: SceneConfig) -> Background:
    if rng.random() < config.gradient_probability:
        names = list(BACKGROUNDS)
        i, j = rng.choice(len(names), size=2, replace=False)
        angle = float(rng.choice([0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]))
        return Background(GRADIENT, BACKGROUNDS[names[i]], BACKGROUNDS[names[j]], angle)
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Background(name, BACKGROUNDS[name], BACKGROUNDS[name])


def _jitter(colour: Colour, rng: np.random.Generator, amount: int) -> RGB:
    deltas = rng.integers(-amount, amount + 1, size=3) if amount else np.zeros(3, int)
    return tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(PALETTE[colour], deltas, strict=True))


def _place(
    spec: ObjectSpec, rng: np.random.Generator, size: int, config: SceneConfig, placed: list, tries: int = 40
) -> tuple[SceneObject, Coverage] | None:
    """Draw the object's free attributes and a position whose footprint respects `placed`; None if no try fits."""
    if spec.colour is None:
        allowed = [c for c in Colour if (c, spec.shape) not in config.holdout]
        colour = allowed[int(rng.integers(len(allowed)))]
    else:
        colour = spec.colour
    obj_size = spec.size or (Size.SMALL if rng.random() < 0.5 else Size.LARGE)
    rgb = _jitter(colour, rng, config.colour_jitter)
    lo, hi = config.small_radius if obj_size is Size.SMALL else config.large_radius
    gap = math.ceil(config.gap * size)
    same_gap = max(gap, math.ceil(config.same_colour_gap * size))
    for _ in range(tries):
        # Rounded to 1/100 pixel and degree: the scene's JSON then stays short and renders the same image.
        radius = round(float(rng.uniform(lo, hi)) * size * SHAPE_SCALE[spec.shape], 2)
        rotation = round(float(rng.uniform(0.0, 360.0)), 2)
        margin = radius + 2
        if 2 * margin >= size:
            return None
        centre = (
            round(float(rng.uniform(margin, size - margin)), 2),
            round(float(rng.uniform(margin, size - margin)), 2),
        )
        cov = coverage(spec.shape, centre, radius, rotation)
        area = np.count_nonzero(cov.footprint)
        fits = True
        for other, other_cov in placed:
            if other.colour is colour or gap:
                if footprint_overlap(other_cov, cov, same_gap if other.colour is colour else gap):
                    fits = False
                    break
            else:
                common = footprint_overlap(other_cov, cov)
                limit = config.max_overlap * min(area, np.count_nonzero(other_cov.footprint))
                if common > limit:
                    fits = False
                    break
        if fits:
            bbox = tuple(round(v, 2) for v in bbox_of(spec.shape, centre, radius, rotation))
            obj = SceneObject(spec.shape, colour, obj_size, centre, radius, rotation, bbox, rgb)
            return obj, cov
    return None


def sample_scene(rng: np.random.Generator, size: int, config: SceneConfig) -> Scene:
    """A random scene of config.min_objects..max_objects objects (fewer when no position fits)."""
    background = sample_background(rng, config)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = list(Shape)
    placed: list[tuple[SceneObject, Coverage]] = []
    previous: SceneObject | None = None
    for _ in range(count):
        if previous is not None and rng.random() < config.repeat_probability:
            shape = previous.shape
            colour = previous.colour if rng.random() < 0.5 else None
        else:
            shape, colour = shapes[int(rng.integers(len(shapes)))], None
        result = _place(ObjectSpec(shape, colour), rng, size, config, placed)
        if result is not None:
            placed.append(result)
            previous = result[0]
    return Scene(size, background, tuple(obj for obj, _ in placed))


def scene_from_specs(
    rng: np.random.Generator,
    size: int,
    specs: Sequence[ObjectSpec],
    relation: tuple[int, int, Relation] | None = None,
    config: SceneConfig | None = None,
    tries: int = 200,
) -> Scene:
    """A scene holding exactly the objects of `specs` (in order), none overlapping, and, when `relation` =
    (i, j, rel) is given, object i clearly `rel` object j. Raises ValueError if no arrangement is found."""
    config = config or SceneConfig(gap=0.012, max_overlap=0.0)
    background = sample_background(rng, config)
    for attempt in range(tries):
        # After half the tries, draw unset sizes small: four large objects may not fit.
        specs_now = [s if s.size or attempt < tries // 2 else ObjectSpec(s.shape, s.colour, Size.SMALL) for s in specs]
        placed: list[tuple[SceneObject, Coverage]] = []
        for spec in specs_now:
            result = _place(spec, rng, size, config, placed, tries=20)
            if result is None:
                break
            placed.append(result)
        if len(placed) < len(specs):
            continue
        objects = tuple(obj for obj, _ in placed)
        if relation is not None:
            i, j, rel = relation
            if clear_relation(objects[i].centre, objects[j].centre, size) is not rel:
                continue
        return Scene(size, background, objects)
    raise ValueError(f"cannot arrange {len(specs)} object(s) in a {size}px scene after {tries} tries")


# ----------------------------------------------------------------------------------------------------------
# Rendering


_GRADIENT_LEVELS = 4096


@functools.lru_cache(maxsize=32)
def _gradient_index(size: int, angle: float) -> np.ndarray:
    """(H, W) int32 in [0, _GRADIENT_LEVELS): the position t of each pixel centre along direction `angle`, from 0
    at the corner furthest against the direction to 1 at the opposite corner (linear in x and y)."""
    a = math.radians(angle)
    coords = np.arange(size, dtype=np.float64) + 0.5
    proj = coords[None, :] * math.cos(a) + coords[:, None] * math.sin(a)  # (H, W)
    t = (proj - proj.min()) / (proj.max() - proj.min())
    return np.rint(t * (_GRADIENT_LEVELS - 1)).astype(np.int32)


def render_background(background: Background, size: int) -> Image.Image:
    if background.start == background.end:
        return Image.new("RGB", (size, size), background.start)
    t = np.linspace(0.0, 1.0, _GRADIENT_LEVELS)[:, None]
    start, end = np.asarray(background.start, np.float64), np.asarray(background.end, np.float64)
    table = np.rint(start + t * (end - start)).astype(np.uint8)  # (levels, 3)
    return Image.fromarray(table[_gradient_index(size, background.angle)], "RGB")  # (H, W, 3)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.size x scene.size pixels."""
    image = render_background(scene.background, scene.size)
    for obj in scene.objects:
        cov = coverage(obj.shape, obj.centre, obj.radius, obj.rotation)
        h, w = cov.alpha.shape
        # Crop the coverage to the image (a scene read from elsewhere may reach past the border).
        x0, y0 = max(cov.x0, 0), max(cov.y0, 0)
        x1, y1 = min(cov.x0 + w, scene.size), min(cov.y0 + h, scene.size)
        if x0 >= x1 or y0 >= y1:
            continue
        alpha = cov.alpha[y0 - cov.y0 : y1 - cov.y0, x0 - cov.x0 : x1 - cov.x0]
        image.paste(obj.rgb, (x0, y0, x1, y1), Image.fromarray(np.ascontiguousarray(alpha), "L"))
    return image
