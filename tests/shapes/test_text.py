"""ShapesEval's text encoders: the template vocabulary tokenizes whole, and with the word-order bias the T5
states carry which colour goes with which shape (without it they are nearly a bag of words)."""

from __future__ import annotations

import pytest

from selfe.components.text_encoders import TextEncoders
from selfe.shapes.scene import CATEGORIES, all_prompts
from selfe.shapes.text import T5_MAX_LENGTH, WORD_ORDER_BIAS, vocabulary, write_text_encoders

RED_FIRST = "a red circle to the left of a blue square"
BLUE_FIRST = "a blue circle to the left of a red square"
CIRCLE = 2  # token index of "circle" in both prompts ("a", "red"/"blue", "circle", ...)


def encoders(folder, t5_order_bias: float) -> TextEncoders:
    t5, clip = write_text_encoders(folder, t5_order_bias=t5_order_bias)
    return TextEncoders.from_snapshots(t5, clip, t5_max_length=T5_MAX_LENGTH)


def circle_change(text: TextEncoders) -> float:
    """How far the state of "circle" moves when its colour and the other object's are swapped (relative)."""
    txt = text.encode([RED_FIRST, BLUE_FIRST])["txt"].float()
    a, b = txt[0, CIRCLE], txt[1, CIRCLE]
    return float((a - b).norm() / ((a.norm() + b.norm()) / 2))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return encoders(tmp_path_factory.mktemp("plain_t5"), 0.0)


def test_every_caption_is_whole_words_within_the_length(plain):
    tokenizer = plain.t5.tokenizer
    words = {"\u2581" + w for w in vocabulary()}
    for prompt in (p.caption for category in CATEGORIES for p in all_prompts(category)):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("fake image, " + prompt)["input_ids"])
        assert len(tokens) <= T5_MAX_LENGTH, prompt
        assert set(tokens) <= words | {"</s>", ","}, (prompt, tokens)


def test_plain_random_t5_is_nearly_a_bag_of_words(plain):
    # MMDiT text tokens carry no position: binding can only live in the states, and here it barely does.
    assert circle_change(plain) < 0.15


def test_word_order_bias_puts_the_colour_into_the_shape_state(tmp_path):
    assert circle_change(encoders(tmp_path, WORD_ORDER_BIAS)) > 0.3
