"""Pretraining ShapesEval's text encoders on the captions: the targets say which object each word describes,
the swapped caption pairs hold the same words, a short pretraining makes the states separate swapped
captions far better than random init, and the written snapshots load through `TextEncoders`, frozen."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from selfe.components.text_encoders import TextEncoders
from selfe.shapes.data import CACHE, TEXT_REPORT, ShapesMismatchError, data_main, prepare
from selfe.shapes.scene import Want, make_prompt
from selfe.shapes.text import CLIP_DIR, T5_DIR, T5_MAX_LENGTH, write_text_encoders
from selfe.shapes.text_pretraining import (
    IGNORE,
    NO_OBJECT,
    ShapesTextPair,
    TextPretraining,
    caption_pairs,
    pretrain,
    pretrain_snapshots,
    separation,
    separation_table,
    t5_targets,
    word_slots,
)

POSITION = make_prompt("position", (Want("circle", "red"), Want("square", "blue")), "to the left of")
# Enough to separate swapped captions clearly (~15 s on 2 busy cores); the default budget goes much further.
SHORT = TextPretraining(steps=150, batch_size=32, lr=3e-3, log_every=50)


@pytest.fixture(scope="module")
def random_snapshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("random_text")
    write_text_encoders(folder)
    return folder


def test_each_word_is_assigned_to_the_object_it_describes():
    assert word_slots(POSITION) == [0, 0, 0, NO_OBJECT, NO_OBJECT, NO_OBJECT, NO_OBJECT, 1, 1, 1]
    two = make_prompt("two_object", (Want("circle"), Want("triangle")))
    assert word_slots(two) == [0, 0, NO_OBJECT, 1, 1]
    assert word_slots(make_prompt("counting", (Want("square", count=3),))) == [0, 0]


def test_t5_targets_follow_the_words_past_the_fake_prefix(random_snapshots):
    pair = ShapesTextPair(random_snapshots / T5_DIR, random_snapshots / CLIP_DIR)
    captions = [POSITION.caption, "fake image, " + POSITION.caption]
    _, _, mask, word_ids = pair.t5_states(captions)
    targets = t5_targets([POSITION, POSITION], [False, True], word_ids)
    plain, prefixed = targets[0][mask[0]], targets[1][mask[1]]
    # The prefix ("fake", "image", ",") is no object's; after it the caption's targets are the plain ones.
    assert (prefixed[:3, 0] == NO_OBJECT).all() and (prefixed[:3, 1:4] == IGNORE).all()
    assert torch.equal(prefixed[3:], plain)
    circle, square = plain[2], plain[9]  # slot, shape, colour (0: unsaid), count (0: unsaid), relation
    assert circle.tolist() == [0, 0, 1, 0, 1] and square.tolist() == [1, 1, 3, 0, 1]
    assert plain[-1, 0] == NO_OBJECT  # </s>


def test_swapped_pairs_hold_the_same_words_in_another_order():
    pairs = caption_pairs()
    assert len(pairs["colours"]) > 400 and len(pairs["order"]) > 400
    for a, b in pairs["colours"][:50] + pairs["order"][:50]:
        assert a != b and sorted(a.split()) == sorted(b.split())
    for a, b in pairs["recolour"][:50]:  # the reference: one word changed
        assert sum(x != y for x, y in zip(a.split(), b.split())) == 1


def test_bad_settings_are_refused():
    for bad in ({"steps": 0}, {"batch_size": 1.5}, {"lr": float("nan")}, {"fake_prefix_fraction": 2.0}):
        with pytest.raises(ValueError, match="TextPretraining"):
            TextPretraining(**bad)


@pytest.fixture(scope="module")
def pretrained(random_snapshots, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained_text")
    for name in (T5_DIR, CLIP_DIR):
        shutil.copytree(random_snapshots / name, folder / name)
    report = pretrain_snapshots(folder / T5_DIR, folder / CLIP_DIR, SHORT, progress=False)
    return folder, report


@pytest.mark.slow
def test_pretrained_states_separate_swapped_captions(pretrained):
    _, report = pretrained
    before, after = report["separation"]["random"], report["separation"]["pretrained"]
    assert before["colours"]["t5_tokens"] < 0.1  # the bag of words of issue 33
    for kind in ("colours", "order"):
        for encoder in ("t5_tokens", "clip_pooled"):
            assert after[kind][encoder] > 2 * before[kind][encoder], (kind, encoder, before, after)
    assert report["probe_accuracy"]["t5_tokens"] > 0.85 and report["probe_accuracy"]["clip_pooled"] > 0.85
    assert len(separation_table(report).splitlines()) == 7


@pytest.mark.slow
def test_the_same_seed_trains_the_same_weights(random_snapshots):
    tiny = TextPretraining(steps=3, batch_size=8)
    trained = []
    for _ in range(2):
        pair = ShapesTextPair(random_snapshots / T5_DIR, random_snapshots / CLIP_DIR)
        pretrain(pair, tiny, progress=False)
        trained.append([*pair.t5.state_dict().values(), *pair.clip.state_dict().values()])
    fresh = ShapesTextPair(random_snapshots / T5_DIR, random_snapshots / CLIP_DIR)
    assert not torch.equal(trained[0][-1], [*fresh.clip.state_dict().values()][-1])  # it did train
    assert all(torch.equal(a, b) for a, b in zip(*trained))


@pytest.mark.slow
def test_the_written_snapshots_load_frozen_and_encode_as_trained(pretrained, random_snapshots):
    folder, report = pretrained
    for name in (T5_DIR, CLIP_DIR):  # the same files, keys and config; only the weights changed
        assert (folder / name / "config.json").read_bytes() == (random_snapshots / name / "config.json").read_bytes()
        with safe_open(str(folder / name / "model.safetensors"), "pt") as new:
            with safe_open(str(random_snapshots / name / "model.safetensors"), "pt") as old:
                assert set(new.keys()) == set(old.keys())
    reloaded = separation(ShapesTextPair(folder / T5_DIR, folder / CLIP_DIR))
    for kind, measured in report["separation"]["pretrained"].items():
        assert reloaded[kind] == pytest.approx(measured, rel=1e-4)
    text = TextEncoders.from_snapshots(folder / T5_DIR, folder / CLIP_DIR, t5_max_length=T5_MAX_LENGTH)
    # Frozen as the paper's are: nothing the MMDiT trainer does can update them.
    assert not any(p.requires_grad for p in [*text.t5.model.parameters(), *text.clip.model.parameters()])
    cond = text.encode([POSITION.caption, "fake image, " + POSITION.caption])
    assert cond["txt_mask"].sum(1).tolist() == [11, 14] and torch.isfinite(cond["txt"]).all()
    assert cond["pooled"].shape == (2, 64) and torch.isfinite(cond["pooled"]).all()


@pytest.mark.slow
def test_data_shapes_pretrained_writes_the_report_reuses_it_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "d"
    tiny = TextPretraining(steps=2, log_every=1)
    prepare(out, 4, progress=False, text_training=tiny)
    report = json.loads((out / TEXT_REPORT).read_text())
    assert report["training"] == {**vars(tiny), "t5_order_bias": 0.0} and (out / CACHE / "index.json").is_file()
    weights = out / T5_DIR / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    prepare(out, 4, progress=False, text_training=tiny)  # the same settings: reused, not pretrained again
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(ShapesMismatchError, match="--text-steps 2, not 3"):
        prepare(out, 4, progress=False, text_training=TextPretraining(steps=3, log_every=1))
    with pytest.raises(ShapesMismatchError, match="--text-encoders pretrained"):
        prepare(out, 4, progress=False)
    random_out = tmp_path / "r"
    prepare(random_out, 4, progress=False)
    with pytest.raises(ShapesMismatchError, match="random-init text encoders"):
        prepare(random_out, 4, progress=False, text_training=tiny)
    with pytest.raises(SystemExit):
        data_main(["shapes", "--out", str(tmp_path / "x"), "--text-steps", "0"])
    assert "--text-steps must be >= 1" in capsys.readouterr().err
