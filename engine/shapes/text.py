"""ShapesEval's text encoders: tiny random-init T5 and CLIP snapshots over the template vocabulary.

A documented stand-in for T5-XXL / CLIP-L at this scale: the real `TextEncoders` path loads them, the
T5 tokenizer knows every template word whole, and the fixed random weights map each caption to token
states that the MMDiT learns to read (no pretrained semantics are needed for a closed vocabulary); an
optional relative-position bias makes those states carry word order, as a trained T5's do.
`selfe data shapes --text-encoders pretrained` trains them on the captions first, as the paper's encoders
are pretrained (selfe.shapes.text_pretraining); the default keeps them random, as the shipped model's are.
They are part of a model: a ShapesEval model ships with the two snapshots it was trained with.
"""

from __future__ import annotations

from pathlib import Path

from selfe.components.text_snapshots import make_clip_snapshot, make_t5_snapshot
from selfe.shapes.scene import COLOURS, COUNT_WORDS, RELATIONS, SHAPES

T5_DIR, CLIP_DIR = "text_encoder", "text_encoder_2"  # the pipeline directory's folder names
TEXT_WIDTH = 64  # T5 d_model = the MMDiT's txt_dim; CLIP hidden = vec_dim
T5_MAX_LENGTH = 16  # the longest caption ("fake image, " prefixed) is 14 T5 tokens with </s>
# `selfe data shapes --t5-order-bias`: 0 keeps T5's random relative-position bias, whose near-uniform
# attention makes the token states a bag of words (colour binding and object order then reach the model only
# through the pooled CLIP vector); WORD_ORDER_BIAS makes the heads look at the previous / next word and all
# before / after, as a trained T5's states carry word order (see `make_t5_snapshot`). The default is the
# setting of the measured runs and of the shipped model; the README gives both settings' tables.
T5_ORDER_BIAS = 0.0
WORD_ORDER_BIAS = 8.0  # near one-hot attention on each head's offsets


def vocabulary() -> tuple[str, ...]:
    """Every word of the caption templates (plurals included) and of the fake-prompt prefix."""
    words = {"a", "and", "fake", "image"}
    words.update(SHAPES, (s + "s" for s in SHAPES), COLOURS, COUNT_WORDS.values())
    for relation in RELATIONS:
        words.update(relation.split())
    return tuple(sorted(words))


def write_text_encoders(out_dir: str | Path, seed: int = 0, t5_order_bias: float = T5_ORDER_BIAS) -> tuple[Path, Path]:
    """Write the T5 and CLIP snapshots under out_dir/text_encoder and out_dir/text_encoder_2; their paths."""
    out = Path(out_dir)
    t5 = make_t5_snapshot(
        out / T5_DIR,
        d_model=TEXT_WIDTH,
        num_layers=2,
        num_heads=4,
        words=vocabulary(),
        seed=seed,
        order_bias=t5_order_bias,
        closed_vocabulary=True,  # the model knows the template words only: the pipeline warns about others
    )
    clip = make_clip_snapshot(out / CLIP_DIR, hidden_size=TEXT_WIDTH, num_layers=2, num_heads=4, seed=seed + 1)
    return t5, clip
