"""ShapesEval scorer: detections match what the generator drew, the category rules pass true images and
fail wrong ones, noise and blank images score near zero, and bad input raises.

Seeds here are held out: the defaults were checked on other seeds while writing the scorer.
"""

from __future__ import annotations

import numpy as np
import pytest

from selfe.shapes import scene
from selfe.shapes.scorer import Detection, ScorerConfig, check, detect, score_image, summarize

PER_CATEGORY = 40  # images per category in each measured set


def _box_blur3(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the same, 3x3 box blurred (edges replicated)."""
    h, w, _ = image.shape
    p = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _noisy(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.rint(image + rng.normal(0.0, sigma, image.shape)), 0, 255).astype(np.uint8)


def _per_category(prompts, images) -> dict:
    return summarize(prompts, [score_image(p, im) for p, im in zip(prompts, images)])


def _random_set(seed: int) -> tuple[list[scene.Prompt], list[list[scene.PlacedObject]]]:
    rng = np.random.default_rng(seed)
    prompts = [scene.random_prompt(rng, c) for c in scene.CATEGORIES for _ in range(PER_CATEGORY)]
    return prompts, [scene.place(p, rng) for p in prompts]


def test_clean_images_detections_match_the_placed_objects():
    prompts, placed = _random_set(seed=90_210)
    for prompt, objects in zip(prompts, placed):
        dets = detect(scene.draw(objects))
        assert len(dets) == len(objects), prompt.caption
        for obj in objects:
            mask = scene.shape_mask(obj.shape, obj.cx, obj.cy, obj.size, scene.IMAGE_SIZE)
            ys, xs = np.nonzero(mask)  # truth: the drawn mask's centroid (a triangle's lies below its box centre)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            near = [d for d in dets if abs(d.cx - cx) <= 1.0 and abs(d.cy - cy) <= 1.0]
            assert len(near) == 1, (prompt.caption, obj, dets)
            assert (near[0].shape, near[0].colour, near[0].area) == (obj.shape, obj.colour, int(mask.sum()))


def test_clean_images_score_high_per_category():
    prompts, placed = _random_set(seed=31_337)
    table = _per_category(prompts, [scene.draw(o) for o in placed])
    assert table["counts"] == {c: PER_CATEGORY for c in scene.CATEGORIES}
    assert all(v >= 0.98 for v in table["categories"].values()), table

    rng = np.random.default_rng(5)
    prompts = scene.evaluation_prompts(images_per_category=PER_CATEGORY)
    table = _per_category(prompts, [scene.render(p, rng) for p in prompts])
    assert all(v >= 0.98 for v in table["categories"].values()), table


def test_float_input_reads_like_uint8_and_larger_images_work():
    rng = np.random.default_rng(11)
    prompt = scene.random_prompt(rng, "position")
    image = scene.render(prompt, rng)
    assert detect(image.astype(np.float32) / 255) == detect(image)
    big = scene.place(prompt, rng, image_size=64)
    dets = detect(scene.draw(big, image_size=64))
    assert sorted((d.shape, d.colour) for d in dets) == sorted((o.shape, o.colour) for o in big)
    assert check(prompt, dets)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda im, rng: _noisy(im, 12.0, rng), id="gaussian-noise-sigma12"),
        pytest.param(lambda im, rng: _box_blur3(im), id="box-blur-3x3"),
        pytest.param(lambda im, rng: _noisy(_box_blur3(im), 6.0, rng), id="blur-3x3-then-noise-sigma6"),
    ],
)
@pytest.mark.slow
def test_noisy_and_blurred_images_still_score_high(corrupt):
    prompts, placed = _random_set(seed=2_718)
    rng = np.random.default_rng(3)
    table = _per_category(prompts, [corrupt(scene.draw(o), rng) for o in placed])
    assert table["overall"] >= 0.95, table
    assert all(v >= 0.9 for v in table["categories"].values()), table


@pytest.mark.parametrize("kind", ["uniform-noise", "background", "black", "white"])
def test_noise_and_blank_images_score_near_zero(kind):
    prompts = scene.evaluation_prompts(images_per_category=PER_CATEGORY)
    rng = np.random.default_rng(8)
    shape = (scene.IMAGE_SIZE, scene.IMAGE_SIZE, 3)
    fill = {"background": scene.BACKGROUND, "black": (0, 0, 0), "white": (255, 255, 255)}
    if kind == "uniform-noise":
        images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in prompts]
    else:
        images = [np.broadcast_to(np.array(fill[kind], np.uint8), shape) for _ in prompts]
    assert _per_category(prompts, images)["overall"] <= 0.05


# ----------------------------------------------------------------------------------------------
# Each rule passes the right detections and fails wrong ones


def _det(shape: str, colour: str = "red", cx: float = 16.0, cy: float = 16.0) -> Detection:
    return Detection(shape, colour, cx, cy, 50)


def _prompt(category: str, *wants: scene.Want, relation: str | None = None) -> scene.Prompt:
    return scene.make_prompt(category, tuple(wants), relation)


def test_single_and_two_object_rules():
    one = _prompt("single_object", scene.Want("circle"))
    assert check(one, [_det("circle")]) and check(one, [_det("square"), _det("circle"), _det("circle")])
    assert not check(one, [_det("square")]) and not check(one, [])
    two = _prompt("two_object", scene.Want("circle"), scene.Want("square"))
    assert check(two, [_det("square", "blue"), _det("circle", "green")])
    assert not check(two, [_det("circle"), _det("circle")])  # the square is missing
    assert not check(two, [_det("square")])


def test_counting_rule_wants_exactly_the_count():
    three = _prompt("counting", scene.Want("triangle", count=3))
    tri = [_det("triangle", c) for c in ("red", "blue", "green")]
    assert check(three, tri) and check(three, [*tri, _det("circle")])  # other shapes ignored
    assert not check(three, tri[:2])
    assert not check(three, [*tri, _det("triangle")])


def test_colors_and_color_attr_rules_need_the_colours():
    red_square = _prompt("colors", scene.Want("square", "red"))
    assert check(red_square, [_det("square", "blue"), _det("square", "red")])
    assert not check(red_square, [_det("square", "blue"), _det("circle", "red")])
    attr = _prompt("color_attr", scene.Want("circle", "red"), scene.Want("square", "blue"))
    assert check(attr, [_det("circle", "red"), _det("square", "blue")])
    assert not check(attr, [_det("circle", "blue"), _det("square", "red")])  # colours swapped
    assert not check(attr, [_det("circle", "red")])


def test_position_rule_reads_the_relation_and_its_margin():
    wants = (scene.Want("circle", "red"), scene.Want("square", "blue"))
    left = _prompt("position", *wants, relation="to the left of")
    a, b = _det("circle", "red", cx=8.0), _det("square", "blue", cx=20.0)
    assert check(left, [a, b]) and check(left, [b, a])
    assert not check(left, [_det("circle", "red", cx=20.0), _det("square", "blue", cx=8.0)])  # swapped
    assert not check(_prompt("position", *wants, relation="to the right of"), [a, b])
    above = _prompt("position", *wants, relation="above")  # y grows downwards
    assert check(above, [_det("circle", "red", cy=5.0), _det("square", "blue", cy=25.0)])
    assert not check(above, [_det("circle", "red", cy=25.0), _det("square", "blue", cy=5.0)])
    close = [_det("circle", "red", cx=15.0), _det("square", "blue", cx=16.5)]
    assert check(left, close) and not check(left, close, ScorerConfig(relation_margin=2.0))
    same = _prompt("position", scene.Want("circle", "red"), scene.Want("circle", "red"), relation="to the left of")
    assert not check(same, [_det("circle", "red")])  # one detection cannot be both objects


def test_summarize_on_a_hand_made_list():
    p = {c: scene.all_prompts(c)[0] for c in scene.CATEGORIES}
    prompts = [p["position"], p["single_object"], p["single_object"], p["position"], p["counting"], p["position"]]
    table = summarize(prompts, [True, True, False, False, True, True])
    assert list(table["categories"]) == ["single_object", "counting", "position"]  # CATEGORIES order
    assert table["categories"] == pytest.approx({"single_object": 0.5, "counting": 1.0, "position": 2 / 3})
    assert table["overall"] == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert table["counts"] == {"single_object": 2, "counting": 1, "position": 3}


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((32, 32), np.uint8), "shape"),
        (np.zeros((32, 32, 4), np.uint8), "shape"),
        (np.zeros((0, 32, 3), np.uint8), "shape"),
        (np.zeros((32, 32, 3), np.int32), "dtype"),
        (np.full((32, 32, 3), np.nan, np.float32), "non-finite"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images_raise(image, match):
    with pytest.raises(ValueError, match=match):
        detect(image)


def test_bad_config_summary_and_prompt_raise():
    with pytest.raises(ValueError, match="connectivity"):
        ScorerConfig(connectivity=6)
    with pytest.raises(ValueError, match="min_area"):
        ScorerConfig(min_area=0)
    with pytest.raises(ValueError, match="colour_ratio"):
        ScorerConfig(colour_ratio=1.5)
    prompt = scene.all_prompts("single_object")[0]
    with pytest.raises(ValueError, match="2 prompts but 1 verdicts"):
        summarize([prompt, prompt], [True])
    with pytest.raises(ValueError, match="no prompts"):
        summarize([], [])
    with pytest.raises(ValueError, match="category"):
        check(scene.Prompt("nonsense", "a circle", (scene.Want("circle"),)), [])
