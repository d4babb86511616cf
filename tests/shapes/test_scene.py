"""ShapesEval scenes: the prompt space, the fixed evaluation set, and rendered images that obey their prompt."""

from __future__ import annotations

import numpy as np
import pytest

from selfe.shapes import scene


def test_prompt_space_follows_the_templates():
    counts = {c: len(scene.all_prompts(c)) for c in scene.CATEGORIES}
    # 3 shapes, 4 colours -> 12 coloured objects; position: ordered distinct pairs x 4 relations.
    assert counts == {
        "single_object": 3,
        "two_object": 6,
        "counting": 6,
        "colors": 12,
        "position": 12 * 11 * 4,
        "color_attr": 12 * 6,
    }
    captions = {p.caption for c in scene.CATEGORIES for p in scene.all_prompts(c)}
    for caption in ("a circle", "a circle and a square", "three triangles", "a red square",
                    "a red circle to the left of a blue square", "a green triangle and a yellow circle"):  # fmt: skip
        assert caption in captions
    with pytest.raises(ValueError, match="unknown ShapesEval category"):
        scene.random_prompt(np.random.default_rng(0), "faces")


def test_evaluation_set_is_fixed_and_balanced():
    a, b = scene.evaluation_prompts(10), scene.evaluation_prompts(10)
    assert a == b and len(a) == 10 * len(scene.CATEGORIES)
    assert [p.category for p in a] == [c for c in scene.CATEGORIES for _ in range(10)]
    assert a != scene.evaluation_prompts(10, seed=1)
    single = [p.caption for p in a if p.category == "single_object"]
    assert sorted(set(single)) == ["a circle", "a square", "a triangle"]  # small categories cycle their prompts
    with pytest.raises(ValueError):
        scene.evaluation_prompts(0)


def test_rendered_objects_are_inside_apart_and_in_the_asked_relation():
    rng = np.random.default_rng(123)
    for _ in range(300):
        prompt = scene.random_prompt(rng)
        objects = scene.place(prompt, rng)
        assert len(objects) == sum(w.count or 1 for w in prompt.wants)
        for want in prompt.wants:
            matching = [o for o in objects if o.shape == want.shape and want.colour in (None, o.colour)]
            assert len(matching) >= (want.count or 1)
        for i, a in enumerate(objects):
            assert (
                a.size / 2 < a.cx < scene.IMAGE_SIZE - a.size / 2 and a.size / 2 < a.cy < scene.IMAGE_SIZE - a.size / 2
            )
            assert scene.shape_mask(a.shape, a.cx, a.cy, a.size, scene.IMAGE_SIZE).sum() > 0.4 * a.size**2
            for b in objects[i + 1 :]:
                reach = (a.size + b.size) / 2 + scene.GAP
                assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach
        if prompt.relation is not None:
            axis, sign = scene.RELATIONS[prompt.relation]
            first, second = objects[0], objects[1]
            along = sign * ((first.cx, first.cy)[axis] - (second.cx, second.cy)[axis])
            assert along >= scene.RELATION_MARGIN
        image = scene.draw(objects)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_same_generator_state_same_image():
    prompt = scene.all_prompts("position")[0]
    one = scene.render(prompt, np.random.default_rng(5))
    two = scene.render(prompt, np.random.default_rng(5))
    assert np.array_equal(one, two) and not np.array_equal(one, scene.render(prompt, np.random.default_rng(6)))
