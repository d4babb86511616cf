"""ShapesEval scenes: prompts from GenEval-like templates and the small RGB images that match them.

A `Prompt` is a caption plus what it asks for (the scorer checks exactly that); `render` draws one
image that satisfies it: one to three flat-coloured circles, squares or triangles on a grey ground,
never touching, so every object is its own connected component. Everything is a pure function of a
numpy Generator, so a seed fixes a data set.

Categories and templates (GenEval's six, in the same order):
    single_object  "a circle"                                   >= 1 circle
    two_object     "a circle and a square"                      >= 1 of each
    counting       "three triangles"                            exactly 3 triangles
    colors         "a red square"                               >= 1 red square
    position       "a red circle to the left of a blue square"  both present, centroids in that order
    color_attr     "a red circle and a blue square"             both present with those colours
Objects a caption does not colour get random colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "yellow": (230, 200, 30),
}
BACKGROUND = (128, 128, 128)  # mid grey: pixel values centred on 0 in [-1, 1]
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# relation -> (axis, sign): the first object's centroid is on the `sign` side of the second's along `axis`
# (axis 0: x to the right, axis 1: y downwards).
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}
COUNT_WORDS = {2: "two", 3: "three"}
IMAGE_SIZE = 32
OBJECT_SIZES = (8, 9, 10, 11)  # side / diameter in pixels at IMAGE_SIZE
GAP = 2  # pixels of background kept between any two objects' bounding boxes
# Rendered scenes: box centres differ by >= this along the relation axis, and by more than across it.
RELATION_MARGIN = 4


@dataclass(frozen=True)
class Want:
    """Objects the caption asks for: `shape`, of `colour` (None: any), exactly `count` of the shape (None: >= 1)."""

    shape: str
    colour: str | None = None
    count: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A caption and what it asks for; `relation` (a RELATIONS key) links wants[0] to wants[1]."""

    category: str
    caption: str
    wants: tuple[Want, ...]
    relation: str | None = None


@dataclass(frozen=True)
class PlacedObject:
    """An object drawn in an image: centre (cx, cy) in pixels, `size` its side / diameter."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: int


def _name(want: Want) -> str:
    return f"{want.colour} {want.shape}" if want.colour else want.shape


def make_prompt(category: str, wants: tuple[Want, ...], relation: str | None = None) -> Prompt:
    """The Prompt of `category` for `wants`, its caption from the category's template."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown ShapesEval category {category!r}; known: {CATEGORIES}")
    if category == "counting":
        (want,) = wants
        caption = f"{COUNT_WORDS[want.count]} {want.shape}s"
    elif category == "position":
        if relation not in RELATIONS:
            raise ValueError(f"position prompts need a relation in {tuple(RELATIONS)}, got {relation!r}")
        caption = f"a {_name(wants[0])} {relation} a {_name(wants[1])}"
    else:
        caption = " and ".join(f"a {_name(w)}" for w in wants)
    return Prompt(category, caption, wants, relation)


def all_prompts(category: str) -> list[Prompt]:
    """Every distinct prompt of a category, in a fixed order."""
    colours = list(COLOURS)
    objects = [(c, s) for s in SHAPES for c in colours]
    if category == "single_object":
        return [make_prompt(category, (Want(s),)) for s in SHAPES]
    if category == "two_object":
        return [make_prompt(category, (Want(a), Want(b))) for a in SHAPES for b in SHAPES if a != b]
    if category == "counting":
        return [make_prompt(category, (Want(s, count=n),)) for n in COUNT_WORDS for s in SHAPES]
    if category == "colors":
        return [make_prompt(category, (Want(s, c),)) for c, s in objects]
    if category == "position":
        return [
            make_prompt(category, (Want(s1, c1), Want(s2, c2)), rel)
            for rel in RELATIONS
            for c1, s1 in objects
            for c2, s2 in objects
            if (c1, s1) != (c2, s2)
        ]
    if category == "color_attr":
        return [
            make_prompt(category, (Want(s1, c1), Want(s2, c2)))
            for c1, s1 in objects
            for c2, s2 in objects
            if s1 != s2 and c1 != c2
        ]
    raise ValueError(f"unknown ShapesEval category {category!r}; known: {CATEGORIES}")


_PROMPTS = {category: all_prompts(category) for category in CATEGORIES}


def random_prompt(rng: np.random.Generator, category: str | None = None) -> Prompt:
    """A prompt drawn uniformly from `category` (None: a category drawn uniformly first)."""
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    prompts = _PROMPTS.get(category)
    if prompts is None:
        raise ValueError(f"unknown ShapesEval category {category!r}; known: {CATEGORIES}")
    return prompts[int(rng.integers(len(prompts)))]


def evaluation_prompts(images_per_category: int = 48, seed: int = 20_251_123) -> list[Prompt]:
    """The fixed evaluation set: `images_per_category` prompts per category (one image each), cycling
    through a seeded shuffle of the category's prompts, so small categories repeat their prompts and
    large ones are sampled. Same arguments, same list."""
    if images_per_category < 1:
        raise ValueError(f"images_per_category must be >= 1, got {images_per_category}")
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for category in CATEGORIES:
        prompts = _PROMPTS[category]
        order = rng.permutation(len(prompts))
        out += [prompts[order[i % len(prompts)]] for i in range(images_per_category)]
    return out


# ----------------------------------------------------------------------------------------------
# Drawing


def shape_mask(shape: str, cx: float, cy: float, size: int, image_size: int) -> np.ndarray:
    """(image_size, image_size) bool: pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
    half = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # apex up, base down; width grows linearly from the apex
        top = cy - half
        depth = (ys - top) / size  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= half * depth)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw(objects: list[PlacedObject], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(image_size, image_size, 3) uint8: the objects on the grey ground."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        image[shape_mask(obj.shape, obj.cx, obj.cy, obj.size, image_size)] = COLOURS[obj.colour]
    return image


def _objects_to_draw(prompt: Prompt, rng: np.random.Generator) -> list[tuple[str, str]]:
    colours = list(COLOURS)
    out = []
    for want in prompt.wants:
        for _ in range(want.count or 1):
            colour = want.colour or colours[int(rng.integers(len(colours)))]
            out.append((want.shape, colour))
    return out


def _apart(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    """True when the two bounding boxes are at least GAP pixels apart along x or y."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    reach = (asz + bsz) / 2 + GAP
    return abs(ax - bx) >= reach or abs(ay - by) >= reach


def place(prompt: Prompt, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> list[PlacedObject]:
    """Positions and sizes for the prompt's objects: inside the image, apart, the relation (if any) clear."""
    todo = _objects_to_draw(prompt, rng)
    scale = image_size / IMAGE_SIZE
    for _ in range(1000):
        boxes: list[tuple[float, float, int]] = []
        for _shape, _colour in todo:
            size = max(4, round(OBJECT_SIZES[int(rng.integers(len(OBJECT_SIZES)))] * scale))
            lo, hi = size / 2 + 1, image_size - size / 2 - 1
            boxes.append((float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size))
        if any(not _apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            continue
        if prompt.relation is not None:
            axis, sign = RELATIONS[prompt.relation]
            along = sign * (boxes[0][axis] - boxes[1][axis])
            across = abs(boxes[0][1 - axis] - boxes[1][1 - axis])
            if along < RELATION_MARGIN * scale or along <= across:  # the relation must be the clear reading
                continue
        return [PlacedObject(s, c, x, y, z) for (s, c), (x, y, z) in zip(todo, boxes)]
    raise RuntimeError(f"could not place the objects of {prompt.caption!r} in a {image_size}px image")


def render(prompt: Prompt, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """One (image_size, image_size, 3) uint8 image that satisfies `prompt`."""
    return draw(place(prompt, rng, image_size), image_size)
