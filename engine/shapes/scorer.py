"""ShapesEval scorer: find the flat-coloured shapes in an image and judge it against its prompt.

The deterministic stand-in for GenEval's detector. `detect` labels every pixel with the palette
colour it is clearly closest to (or background), splits each colour into connected components,
drops components too small (noise) or too elongated (no scene shape), and names each remaining one
from the moments of its soft mass (how much of the colour each of its pixels and their neighbours
hold): an up-pointing triangle is skewed downwards, a square is more kurtotic along its diagonals
than along its sides, a disc is neither. Unlike a fill ratio (area / bounding box), these survive a
blur, which rounds an 8-pixel square's corners and fills a triangle's. `check` then applies the
prompt category's GenEval rule (see `selfe.shapes.scene`), and `summarize` turns per-image verdicts
into GenEval's table: the fraction correct per category and their mean.

Geometry follows scene.py: x to the right, y downwards, pixel (i, j) has its centre at (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selfe.shapes import scene

_REFERENCE_SIZE = scene.IMAGE_SIZE  # min_area is given for a square image of this side


@dataclass(frozen=True)
class Detection:
    """One object found in an image: its shape and colour names, centroid (cx, cy) in pixels
    (pixel centres at +0.5, as scene.PlacedObject) and area in pixels."""

    shape: str
    colour: str
    cx: float
    cy: float
    area: int


@dataclass(frozen=True)
class ScorerConfig:
    """How `detect` reads an image and `check` reads a relation. Defaults come from the scene's geometry
    and palette, not from any model's output.

    colour_ratio: a pixel takes palette colour c when its RGB distance to c is below `colour_ratio` times
        its distance to the background and to every other palette colour; otherwise it is background
        (ambiguous pixels count as background). 1.0 would split RGB space at the midpoints; 0.75 leaves a
        dead band around them, so a pixel must be at least 4/7 of a colour (a 3x3 box blur keeps a
        straight edge's inner pixels at 2/3, and the band rejects half-and-half mixtures).
    max_distance: RGB distance (0-255 units) beyond which a pixel is no palette colour at all, however it
        compares with the others. About 2/3 of the smallest palette-to-background distance (green, ~118).
    min_area: components smaller than this many pixels are noise, given for a 32x32 image and scaled by
        the pixel count of the image (H * W / 32**2). The smallest object the scene draws (a triangle of
        side 8) covers about 36 pixels; 12 keeps a third of it and is far above what scattered noise
        pixels join into.
    connectivity: 4 or 8; neighbours that join a component. 8 keeps a noisy object whole (a hole's
        diagonal neighbours still connect); objects never come closer than scene.GAP = 2 pixels.
    triangle_max_skew: a component whose vertical skewness (third standardised moment of y, y downwards) is
        below this is a triangle. The scene's triangles point up, so their mass grows linearly downwards:
        skewness -2*sqrt(2)/5 = -0.566, against 0 for a disc or a square. A blur of variance b^2 scales it
        by (s^2 / (s^2 + b^2))^1.5 (s^2: the shape's own variance); a third of -0.566 still holds after a
        blur as wide as the shape itself.
    square_min_kurtosis_gap: a non-triangle whose mean kurtosis along the diagonals exceeds its mean
        kurtosis along x and y by more than this is a square, else a circle. A square's mass projects
        uniformly onto its sides (kurtosis 1.8) and triangularly onto its diagonals (2.4): gap 0.6; a
        disc looks the same every way: gap 0. Pixels make small discs squarish: the most square-like
        circle the scene rasterizes (diameter 9 centred on a pixel corner: an 8x8 block less its corner
        pixels) has gap 0.36, every rasterized square >= 0.6; a blur scales the gap by
        (s^2 / (s^2 + b^2))^2 (a 3x3 box blur leaves an 8-pixel square ~0.47). 0.4 sits between.
    max_aspect: components whose bounding box is longer than `max_aspect` times its width (either way)
        are dropped: every scene shape is as wide as it is tall, so a streak is no object.
    relation_margin: pixels along the relation's axis. "A to the left of B" holds when B.cx - A.cx >
        relation_margin ("above": B.cy - A.cy > margin; y grows downwards). The scene keeps box
        centres >= scene.RELATION_MARGIN = 4 apart, but a triangle's centroid lies size/6 (up to 11/6 px)
        below its box centre, so centroids of a rendered "above"/"below" pair may be only ~2.2 px apart;
        1 px leaves the rest for detection error. Not scaled with the image: `check` never sees it.
    """

    colour_ratio: float = 0.75
    max_distance: float = 80.0
    min_area: int = 12
    connectivity: int = 8
    triangle_max_skew: float = -2 * math.sqrt(2) / 5 / 3
    square_min_kurtosis_gap: float = 0.4
    max_aspect: float = 2.0
    relation_margin: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.colour_ratio <= 1.0:
            raise ValueError(f"colour_ratio must be in (0, 1], got {self.colour_ratio}")
        if self.max_distance <= 0:
            raise ValueError(f"max_distance must be > 0, got {self.max_distance}")
        if self.min_area < 1:
            raise ValueError(f"min_area must be >= 1, got {self.min_area}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.triangle_max_skew >= 0:
            raise ValueError(f"triangle_max_skew must be < 0 (triangles point up), got {self.triangle_max_skew}")
        if self.square_min_kurtosis_gap <= 0:
            raise ValueError(f"square_min_kurtosis_gap must be > 0, got {self.square_min_kurtosis_gap}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.relation_margin < 0:
            raise ValueError(f"relation_margin must be >= 0, got {self.relation_margin}")


_COLOUR_NAMES = tuple(scene.COLOURS)
# (1 + n_colours, 3): background first, then the palette in COLOURS order
_REFERENCES = np.array([scene.BACKGROUND, *scene.COLOURS.values()], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Pixels -> components


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 255] from uint8, or from float in [0, 1] (clipped)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("image has non-finite values")
        return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0
    raise ValueError(f"image dtype must be uint8 or float in [0, 1], got {image.dtype}")


def classify_pixels(image: np.ndarray, config: ScorerConfig = ScorerConfig()) -> np.ndarray:
    """(H, W) int: index into COLOURS of each pixel's palette colour, -1 for background or ambiguous.

    image: (H, W, 3) uint8, or float in [0, 1].
    """
    rgb = _as_rgb255(image)
    dist = np.linalg.norm(rgb[:, :, None, :] - _REFERENCES, axis=-1)  # (H, W, 1 + n_colours)
    order = np.argsort(dist, axis=-1)
    nearest, second = order[..., 0], order[..., 1]
    d1 = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]
    d2 = np.take_along_axis(dist, second[..., None], -1)[..., 0]
    clear = (nearest > 0) & (d1 < config.colour_ratio * d2) & (d1 <= config.max_distance)
    return np.where(clear, nearest - 1, -1)


def label_components(classes: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """(H, W) int: a component id per pixel, -1 for background; pixels share an id when connected
    through neighbours of the same class. Ids are flat pixel indices (the component's smallest one).

    classes: (H, W) int, -1 for background. Min-label propagation with pointer jumping, in numpy.
    """
    h, w = classes.shape
    fg = classes >= 0
    labels = np.where(fg, np.arange(h * w).reshape(h, w), h * w)
    pad = h * w  # larger than any label: padding never wins a minimum
    shifts = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        shifts += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    padded_cls = np.pad(classes, 1, constant_values=-1)
    # same[k]: the neighbour at shifts[k] exists and has this pixel's class
    same = [fg & (padded_cls[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == classes) for dy, dx in shifts]
    while True:
        padded = np.pad(labels, 1, constant_values=pad)
        new = labels
        for (dy, dx), ok in zip(shifts, same):
            new = np.where(ok, np.minimum(new, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]), new)
        flat = new.reshape(-1)
        new = np.where(fg, flat[np.minimum(flat, h * w - 1)].reshape(h, w), new)  # pointer jumping
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _memberships(image: np.ndarray) -> np.ndarray:
    """(H, W, n_colours) float32 in [0, 1]: how much of each palette colour a pixel holds, its position
    along the segment from the background to the colour (0: background, 1: the colour)."""
    rgb = _as_rgb255(image)
    axes = _REFERENCES[1:] - _REFERENCES[0]  # (n_colours, 3)
    return np.clip((rgb - _REFERENCES[0]) @ axes.T / (axes**2).sum(-1), 0.0, 1.0)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: `mask` grown by one pixel, 8-connected."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def _standardised_moments(weights: np.ndarray, coords: np.ndarray) -> tuple[float, float]:
    """Skewness and kurtosis of `coords` under `weights` (same shape, weights summing to > 0)."""
    mean = (weights * coords).sum() / weights.sum()
    d = coords - mean
    var = max(float((weights * d**2).sum() / weights.sum()), 1e-6)
    skew = float((weights * d**3).sum() / weights.sum()) / var**1.5
    kurt = float((weights * d**4).sum() / weights.sum()) / var**2
    return skew, kurt


def _shape_of(weights: np.ndarray, config: ScorerConfig) -> str:
    """The shape whose moments `weights` ((H, W) soft mass of one component) has."""
    h, w = weights.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    skew_y, kurt_y = _standardised_moments(weights, ys)
    if skew_y < config.triangle_max_skew:
        return "triangle"
    _, kurt_x = _standardised_moments(weights, xs)
    _, kurt_u = _standardised_moments(weights, (xs + ys) / math.sqrt(2))
    _, kurt_v = _standardised_moments(weights, (xs - ys) / math.sqrt(2))
    if (kurt_u + kurt_v) / 2 - (kurt_x + kurt_y) / 2 > config.square_min_kurtosis_gap:
        return "square"
    return "circle"


def detect(image: np.ndarray, config: ScorerConfig = ScorerConfig()) -> list[Detection]:
    """The objects in `image`, ordered by their first pixel in raster order.

    image: (H, W, 3) uint8 RGB, or float RGB in [0, 1] (values outside are clipped; NaN/inf raise).
    A detection's colour, centroid and area are its component's (pixels clearly of that colour); its
    shape comes from the soft mass of the component and the ring of pixels around it (no other
    component's), so the blurred edge a hard threshold cuts off still counts.
    """
    classes = classify_pixels(image, config)
    h, w = classes.shape
    labels = label_components(classes, config.connectivity)
    min_area = max(1, round(config.min_area * h * w / _REFERENCE_SIZE**2))
    ids, area = np.unique(labels[labels >= 0], return_counts=True)
    members = None
    out = []
    for k, a in zip(ids.tolist(), area.tolist()):
        if a < min_area:
            continue
        comp = labels == k
        ys, xs = np.nonzero(comp)
        bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        if max(bw, bh) > config.max_aspect * min(bw, bh):
            continue
        colour = int(classes.reshape(-1)[k])
        if members is None:
            members = _memberships(image)
        region = comp | (_dilate(comp) & (labels < 0))
        shape = _shape_of(np.where(region, members[:, :, colour], 0.0), config)
        out.append(Detection(shape, _COLOUR_NAMES[colour], float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, a))
    return out


# ----------------------------------------------------------------------------------------------
# Detections -> verdicts


def _matches(want: scene.Want, det: Detection) -> bool:
    return det.shape == want.shape and (want.colour is None or det.colour == want.colour)


def _relation_holds(a: Detection, b: Detection, relation: str, margin: float) -> bool:
    """`a` is `relation` `b`: a's centroid lies on the relation's side of b's by more than `margin`."""
    axis, sign = scene.RELATIONS[relation]
    along = (a.cx - b.cx) if axis == 0 else (a.cy - b.cy)
    return sign * along > margin


def check(prompt: scene.Prompt, detections: Sequence[Detection], config: ScorerConfig = ScorerConfig()) -> bool:
    """GenEval's rule for the prompt's category, on the objects `detect` found.

    single_object / two_object / colors / color_attr: every wanted object (shape, and colour where the
    caption gives one) is present, each as its own detection; counting: exactly `count` objects of the
    shape (other shapes ignored); position: a detection matching wants[0] and a different one matching
    wants[1] with the relation holding between their centroids (margin: config.relation_margin).
    """
    if prompt.category not in scene.CATEGORIES:
        raise ValueError(f"unknown ShapesEval category {prompt.category!r}; known: {scene.CATEGORIES}")
    if not prompt.wants:
        raise ValueError(f"prompt {prompt.caption!r} wants no objects")
    dets = list(detections)
    if prompt.category == "counting":
        (want,) = prompt.wants
        if want.count is None:
            raise ValueError(f"counting prompt {prompt.caption!r} has no count")
        return sum(_matches(want, d) for d in dets) == want.count
    if prompt.category == "position":
        if prompt.relation not in scene.RELATIONS or len(prompt.wants) != 2:
            raise ValueError(
                f"position prompt {prompt.caption!r} needs two wants and a relation in {tuple(scene.RELATIONS)}"
            )
        first, second = prompt.wants
        return any(
            _matches(first, a)
            and _matches(second, b)
            and _relation_holds(a, b, prompt.relation, config.relation_margin)
            for i, a in enumerate(dets)
            for j, b in enumerate(dets)
            if i != j
        )
    return _distinct_match(prompt.wants, dets, frozenset())


def _distinct_match(wants: Sequence[scene.Want], dets: list[Detection], used: frozenset[int]) -> bool:
    """True when each want matches its own detection (none used twice): a small backtracking search."""
    if not wants:
        return True
    return any(
        _matches(wants[0], d) and _distinct_match(wants[1:], dets, used | {i})
        for i, d in enumerate(dets)
        if i not in used
    )


def score_image(prompt: scene.Prompt, image: np.ndarray, config: ScorerConfig = ScorerConfig()) -> bool:
    """Whether `image` ((H, W, 3) uint8, or float in [0, 1]) shows what `prompt` asks for."""
    return check(prompt, detect(image, config), config)


def summarize(prompts: Sequence[scene.Prompt], correct: Sequence[bool]) -> dict:
    """GenEval's table from per-image verdicts.

    Returns {"categories": {category: fraction correct}, "overall": mean of those fractions,
    "counts": {category: number of images}}, over the categories present, in scene.CATEGORIES order.
    """
    if len(prompts) != len(correct):
        raise ValueError(f"got {len(prompts)} prompts but {len(correct)} verdicts")
    if len(prompts) == 0:
        raise ValueError("nothing to summarize: no prompts")
    hits = {c: 0 for c in scene.CATEGORIES}
    counts = {c: 0 for c in scene.CATEGORIES}
    for prompt, ok in zip(prompts, correct):
        if prompt.category not in counts:
            raise ValueError(f"unknown ShapesEval category {prompt.category!r}; known: {scene.CATEGORIES}")
        counts[prompt.category] += 1
        hits[prompt.category] += bool(ok)
    present = [c for c in scene.CATEGORIES if counts[c]]
    fractions = {c: hits[c] / counts[c] for c in present}
    return {
        "categories": fractions,
        "overall": sum(fractions.values()) / len(fractions),
        "counts": {c: counts[c] for c in present},
    }
