"""ShapesEval's text encoders: the template vocabulary tokenizes whole, and the T5 states carry word order."""

from __future__ import annotations

import pytest
import torch

from selfe.shapes.scene import CATEGORIES, all_prompts
from selfe.shapes.text import T5_MAX_LENGTH, vocabulary, write_text_encoders
from selfe.text_encoders import TextEncoders
from selfe.text_snapshots import make_t5_snapshot

RED_FIRST = "a red circle to the left of a blue square"
BLUE_FIRST = "a blue circle to the left of a red square"
CIRCLE = 2  # token index of "circle" in both prompts ("a", "red"/"blue", "circle", ...)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    t5, clip = write_text_encoders(tmp_path_factory.mktemp("shapes_text"))
    return TextEncoders.from_snapshots(t5, clip, t5_max_length=T5_MAX_LENGTH)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / ((a.norm() + b.norm()) / 2))


def circle_states(encoders: TextEncoders) -> tuple[torch.Tensor, torch.Tensor]:
    txt = encoders.encode([RED_FIRST, BLUE_FIRST])["txt"].float()
    return txt[0, CIRCLE], txt[1, CIRCLE]


def test_every_caption_is_whole_words_within_the_length(encoders):
    tokenizer = encoders.t5.tokenizer
    words = {"\u2581" + w for w in vocabulary()}
    for prompt in (p.caption for category in CATEGORIES for p in all_prompts(category)):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("fake image, " + prompt)["input_ids"])
        assert len(tokens) <= T5_MAX_LENGTH, prompt
        assert set(tokens) <= words | {"</s>", ","}, (prompt, tokens)


def test_token_states_carry_which_colour_goes_with_which_shape(encoders):
    # MMDiT text tokens have no position, so binding must live in the states: "circle" after "red" must
    # differ from "circle" after "blue" by a large fraction of its norm.
    red_circle, blue_circle = circle_states(encoders)
    assert relative_change(red_circle, blue_circle) > 0.3


def test_plain_random_t5_is_nearly_a_bag_of_words(tmp_path):
    # Why the order bias exists: with T5's own random init the same comparison moves by only a few percent.
    t5 = make_t5_snapshot(tmp_path / "t5", d_model=64, num_layers=2, num_heads=4, words=vocabulary(), seed=0)
    _, clip = write_text_encoders(tmp_path / "other")
    red_circle, blue_circle = circle_states(TextEncoders.from_snapshots(t5, clip, t5_max_length=T5_MAX_LENGTH))
    assert relative_change(red_circle, blue_circle) < 0.15
