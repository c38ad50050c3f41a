"""Classical analysis of shape images, no learned detector: background estimation, colour segmentation to the
named palette, connected components, and shape classification from each component's mask.

    1. The image is resized so that its longer side is `work_size` (box filter down, bilinear up).
    2. Background: a plane a + b x + c y per RGB channel, fitted by least squares to the border pixels, then
       refitted to every pixel close to it (a linear gradient is a plane; objects touching the border drop out).
    3. Colours: each pixel goes to its nearest palette colour in Lab (lightness weighted by 1/2) if that is
       within `colour_tolerance`, the pixel is at least `background_tolerance` away from the background, and it
       is nearer the palette colour than the background.
    4. Each colour's mask is opened (3x3) to drop anti-aliased seams, then split into 4-connected components of
       at least `min_area`; a component's shape is read from the pixels of its colour within one pixel of it
       (opening cuts corners).
    5. Shapes, from that mask with its holes filled: a hole of `hole_fraction` or more makes a ring (if the
       outline is round); solidity (area / convex hull area) below `star_solidity` makes a star (if its hull is
       a pentagon); otherwise the convex shape is the prototype nearest in (isoperimetric quotient, inradius /
       circumradius) of the hull: triangle, square, hexagon, circle. Features too far from every prototype give
       no shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sana.errors import ConfigError
from sana.shapes.scene import PALETTE, Colour, Shape, dilate, erode

LAB_WEIGHTS = np.array([0.5, 1.0, 1.0], np.float32)  # lightness counts half: shading matters less than hue
COLOURS = tuple(Colour)

# (isoperimetric quotient 4 pi A / P^2, inradius / circumradius) of the convex hull of each regular shape.
PROTOTYPES: dict[Shape, tuple[float, float]] = {
    Shape.TRIANGLE: (math.pi / (3 * math.sqrt(3)), 0.5),
    Shape.SQUARE: (math.pi / 4, math.cos(math.pi / 4)),
    Shape.HEXAGON: (math.pi / (2 * math.sqrt(3)), math.cos(math.pi / 6)),
    Shape.CIRCLE: (1.0, 1.0),
}
PENTAGON = (math.pi / (5 * math.tan(math.pi / 5)), math.cos(math.pi / 5))  # the hull of a star


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the classical detector (distances are weighted Lab units, areas fractions)."""

    work_size: int = 256
    colour_tolerance: float = 30.0
    background_tolerance: float = 18.0
    min_area: float = 0.0012  # of the image area
    hole_fraction: float = 0.08  # hole area / filled area that makes a ring
    star_solidity: float = 0.8
    prototype_distance: float = 0.15  # the farthest a shape's features may lie from its prototype

    def __post_init__(self):
        if self.work_size < 32:
            raise ConfigError(f"work_size must be >= 32, got {self.work_size}")
        if not 0 < self.min_area < 0.5:
            raise ConfigError(f"min_area must be in (0, 0.5), got {self.min_area}")


@dataclass(frozen=True)
class Detection:
    """One object found: its colour, its shape (None when unrecognised), where it is (pixels of the input image)
    and the features its shape was read from."""

    colour: Colour
    shape: Shape | None
    centre: tuple[float, float]
    bbox: tuple[float, float, float, float]
    area: float  # fraction of the image
    features: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "colour": self.colour.value,
            "shape": self.shape and self.shape.value,
            "centre": [round(v, 1) for v in self.centre],
            "bbox": [round(v, 1) for v in self.bbox],
            "area": round(self.area, 5),
            "features": {k: round(v, 3) for k, v in self.features.items()},
        }


# ----------------------------------------------------------------------------------------------------------
# Colour


def _linear(c: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] to linear light."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LINEAR_LUT = _linear(np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)
_RGB_TO_XYZ = (
    np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        np.float32,
    )
    / np.array([[0.95047], [1.0], [1.08883]], np.float32)  # relative to the D65 white
)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of sRGB values in [0, 255], shape (..., 3)."""
    rgb = np.asarray(rgb)
    linear = _LINEAR_LUT[rgb] if rgb.dtype == np.uint8 else _linear(rgb.astype(np.float32) / 255.0)
    xyz = linear @ _RGB_TO_XYZ.T
    e = (6 / 29) ** 3
    f = np.where(xyz > e, np.cbrt(np.maximum(xyz, e)), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_LAB_BITS = 6  # the Lab of uint8 colours is looked up on a 64^3 grid (error below 1.5 units)
_LAB_LUT: np.ndarray | None = None


def lab_of_uint8(rgb: np.ndarray) -> np.ndarray:
    """srgb_to_lab of a uint8 (..., 3) array through a lookup table on the 64^3 grid of colours (cell centres)."""
    global _LAB_LUT
    if _LAB_LUT is None:
        step = 256 >> _LAB_BITS
        levels = np.arange(step / 2 - 0.5, 256, step, dtype=np.float32)
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1)
        _LAB_LUT = srgb_to_lab(grid).astype(np.float32).reshape(-1, 3)
    q = (rgb >> (8 - _LAB_BITS)).astype(np.int32)
    return _LAB_LUT[(q[..., 0] << (2 * _LAB_BITS)) | (q[..., 1] << _LAB_BITS) | q[..., 2]]


PALETTE_LAB = (srgb_to_lab(np.array([PALETTE[c] for c in COLOURS], np.float32)) * LAB_WEIGHTS).astype(np.float32)


def estimate_background(rgb: np.ndarray, border: int = 3, tolerance: float = 12.0, stride: int = 3) -> np.ndarray:
    """The background under `rgb` (H, W, 3) as a plane per channel, (H, W, 3) float32. The plane is fitted to the
    border ring, then to the pixels (of a `stride` grid) within `tolerance` of the previous fit."""
    h, w, _ = rgb.shape
    ring = np.zeros((h, w), bool)
    ring[:border], ring[-border:], ring[:, :border], ring[:, -border:] = True, True, True, True
    sample = ring.copy()
    sample[::stride, ::stride] = True
    ys, xs = np.nonzero(sample)
    design = np.stack([np.ones(len(xs), np.float32), xs / w, ys / h], axis=1).astype(np.float32)  # (S, 3)
    values = rgb[ys, xs].astype(np.float32)  # (S, 3)
    on_ring = ring[ys, xs]
    keep = on_ring
    for step in range(4):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)  # (3, 3)
        residual = np.sqrt(((values - design @ coef) ** 2).sum(1))
        if step == 0:  # the border ring without the objects that touch it
            keep = on_ring & (residual < max(tolerance, 2.5 * float(np.median(residual[on_ring]))))
        else:  # every sampled pixel close to the plane
            keep = residual < tolerance
        if keep.sum() < 16:
            break
    x = (np.arange(w, dtype=np.float32) / w)[None, :, None]
    y = (np.arange(h, dtype=np.float32) / h)[:, None, None]
    return coef[0] + coef[1] * x + coef[2] * y  # (H, W, 3)


def classify_colours(rgb: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """Palette index per pixel of (H, W, 3) `rgb`, -1 for background or unnamed colours."""
    lab = lab_of_uint8(rgb) * LAB_WEIGHTS  # (H, W, 3)
    background = lab_of_uint8(np.clip(np.rint(estimate_background(rgb)), 0, 255).astype(np.uint8)) * LAB_WEIGHTS
    # Squared distances to the palette, |x|^2 - 2 x.p + |p|^2: (H, W, 8)
    d2 = (lab**2).sum(-1, keepdims=True) - 2 * lab @ PALETTE_LAB.T + (PALETTE_LAB**2).sum(-1)
    nearest = d2.argmin(-1)
    d_nearest = np.sqrt(np.maximum(np.take_along_axis(d2, nearest[..., None], -1)[..., 0], 0))
    d_background = np.sqrt(((lab - background) ** 2).sum(-1))
    named = (d_nearest <= config.colour_tolerance) & (d_background >= config.background_tolerance)
    named &= d_nearest < d_background
    return np.where(named, nearest, -1)


# ----------------------------------------------------------------------------------------------------------
# Connected components


def label_components(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of equal non-negative values of `classes` (H, W): labels (H, W) int32, 0 where
    `classes` < 0, and 1..K for the K components in row-major order of their first pixel.

    Row runs of equal value are the nodes; a run is joined to each run above it that it touches with the same
    value; components are found by hooking and pointer jumping over those edges.
    """
    h, w = classes.shape
    flat = classes.ravel()
    new_run = np.ones(h * w, bool)
    new_run[1:] = flat[1:] != flat[:-1]
    new_run[::w] = True
    starts = np.flatnonzero(new_run)  # runs partition the image in row-major order
    lengths = np.diff(np.append(starts, h * w))
    values = flat[starts]
    # Edges: every foreground run below row 0 against the runs of the row above covering its columns.
    below = np.flatnonzero((starts >= w) & (values >= 0))
    first = np.searchsorted(starts, starts[below] - w, side="right") - 1
    last = np.searchsorted(starts, starts[below] + lengths[below] - 1 - w, side="right") - 1
    span = last - first + 1
    offsets = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
    a = np.repeat(below, span)
    b = np.repeat(first, span) + offsets
    same = values[a] == values[b]
    a, b = a[same], b[same]
    parent = np.arange(len(starts))
    while True:
        pa, pb = parent[a], parent[b]
        low = np.minimum(pa, pb)
        new = parent.copy()
        np.minimum.at(new, pa, low)  # hook both roots under the smaller
        np.minimum.at(new, pb, low)
        while True:  # pointer jumping to the roots
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, parent):
            break
        parent = new
    roots = np.where(values >= 0, parent, -1)
    unique, run_label = np.unique(roots, return_inverse=True)
    run_label = run_label.astype(np.int32) + (0 if unique[0] == -1 else 1)
    # unique() sorts roots, and a root is its component's first run, so labels follow row-major order.
    return np.repeat(run_label, lengths).reshape(h, w), int((unique >= 0).sum())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` (H, W) bool with every region of False not connected to the border set True."""
    padded = np.pad(~mask, 1, constant_values=True)
    labels, _ = label_components(np.where(padded, 0, -1))
    outside = labels[0, 0]
    return ~(labels[1:-1, 1:-1] == outside)


# ----------------------------------------------------------------------------------------------------------
# Shape features


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (K, 2) of (N, 2) points, counter-clockwise in (x, y) with y up (Andrew's monotone chain)."""
    pts = [tuple(p) for p in np.unique(points, axis=0).tolist()]  # sorted by x, then y
    if len(pts) <= 2:
        return np.array(pts, np.float64)

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2:
                (x1, y1), (x2, y2) = out[-2], out[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) > 0:
                    break
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1], np.float64)


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Features of one object's mask (H, W) bool: area, hole fraction, solidity, and the isoperimetric quotient
    and inradius / circumradius (about the centroid) of the convex hull of its pixel centres."""
    filled = fill_holes(mask)
    area = float(filled.sum())
    hole = 1.0 - float(mask.sum()) / area
    rows = np.flatnonzero(filled.any(1))
    left = filled[rows].argmax(1)
    right = filled.shape[1] - 1 - filled[rows, ::-1].argmax(1)
    points = np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)])
    hull = convex_hull(points.astype(np.float64))
    ys, xs = np.nonzero(filled)
    centre = np.array([xs.mean(), ys.mean()])
    if len(hull) < 3:
        return {"area": area, "hole": hole, "solidity": 1.0, "roundness": 0.0, "radius_ratio": 0.0}
    nxt = np.roll(hull, -1, axis=0)
    edges = nxt - hull
    lengths = np.linalg.norm(edges, axis=1)
    perimeter = float(lengths.sum())
    hull_area = 0.5 * abs(float(np.sum(hull[:, 0] * nxt[:, 1] - nxt[:, 0] * hull[:, 1])))
    # Each pixel is a unit square around its centre: for the area, grow the hull by half a pixel (a Minkowski
    # sum with a disc). Roundness and radii use the hull itself, whose corners are the sharper.
    grown_area = hull_area + 0.5 * perimeter + math.pi / 4
    rel = centre - hull
    cross = np.abs(edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0]) / np.maximum(lengths, 1e-9)
    return {
        "area": area,
        "hole": hole,
        "solidity": area / grown_area,
        "roundness": 4 * math.pi * hull_area / perimeter**2,
        "radius_ratio": float(cross.min()) / float(np.linalg.norm(rel, axis=1).max()),
    }


def _distance(features: dict[str, float], prototype: tuple[float, float]) -> float:
    return math.hypot(features["roundness"] - prototype[0], features["radius_ratio"] - prototype[1])


def classify_shape(features: dict[str, float], config: DetectorConfig) -> Shape | None:
    """The shape whose prototype the features match (see the module docstring), or None."""
    hull_shape = min(PROTOTYPES, key=lambda s: _distance(features, PROTOTYPES[s]))
    if features["hole"] >= config.hole_fraction:
        round_enough = _distance(features, PROTOTYPES[Shape.CIRCLE]) <= config.prototype_distance
        return Shape.RING if round_enough and features["hole"] < 0.6 else None
    if features["solidity"] < config.star_solidity:
        is_star = _distance(features, PENTAGON) <= config.prototype_distance and features["solidity"] > 0.4
        return Shape.STAR if is_star else None
    return hull_shape if _distance(features, PROTOTYPES[hull_shape]) <= config.prototype_distance else None


# ----------------------------------------------------------------------------------------------------------
# Detection


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 array from a PIL image or an (H, W, 3) uint8 / float-in-[0, 1] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return array


def detect_objects(image: Image.Image | np.ndarray, config: DetectorConfig | None = None) -> list[Detection]:
    """Every object of a palette colour in `image`, largest first."""
    config = config or DetectorConfig()
    rgb = to_rgb_array(image)
    full_h, full_w, _ = rgb.shape
    scale = max(full_h, full_w) / config.work_size
    if scale != 1:  # down: box filter; up (small images): bilinear, so that outlines get sub-pixel detail
        size = (max(1, round(full_w / scale)), max(1, round(full_h / scale)))
        method = Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR
        rgb = np.asarray(Image.fromarray(rgb).resize(size, method))
    h, w, _ = rgb.shape
    sx, sy = full_w / w, full_h / h
    classes = classify_colours(rgb, config)
    opened = np.full_like(classes, -1)
    for index in np.unique(classes[classes >= 0]):
        mask = dilate(erode(classes == index))
        opened[mask] = index
    labels, count = label_components(opened)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    found = []
    for k in np.flatnonzero(areas >= config.min_area * h * w):
        if k == 0:
            continue
        ys, xs = np.nonzero(labels == k)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        index = int(opened[ys[0], xs[0]])
        # The shape is read from the pixels of its colour around the opened component: opening cuts corners.
        y0, y1, x0, x1 = max(y0 - 1, 0), min(y1 + 1, h), max(x0 - 1, 0), min(x1 + 1, w)
        near = dilate(np.pad(labels[y0:y1, x0:x1] == k, 1))[1:-1, 1:-1]
        features = shape_features(near & (classes[y0:y1, x0:x1] == index))
        colour = COLOURS[index]
        found.append(
            Detection(
                colour=colour,
                shape=classify_shape(features, config),
                centre=((xs.mean() + 0.5) * sx, (ys.mean() + 0.5) * sy),
                bbox=(x0 * sx, y0 * sy, x1 * sx, y1 * sy),
                area=float(areas[k]) / (h * w),
                features=features,
            )
        )
    return sorted(found, key=lambda d: -d.area)
