"""TextConditioner: caption dropout, null and fake-prompt conditions, with a fake encoder and with tiny
T5 + CLIP snapshots."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from selfe.components.text_encoders import TextEncoders
from selfe.method.conditioning import ConditioningConfig, TextConditioner

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

CAPTIONS = ["a photo of a cat", "a red dog", "the blue table", "a cat on the table", "dog", "a photo"]


class WordHashEncoder:
    """A stand-in PromptEncoder: one seeded random vector per word, padded to the longest prompt.
    Records every call so tests can see which prompts were encoded."""

    def __init__(self, width: int = 8):
        self.width = width
        self.calls: list[list[str]] = []

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(prompts))
        words = [prompt.split() + ["</s>"] for prompt in prompts]
        length = max(len(w) for w in words)
        txt = torch.zeros(len(prompts), length, self.width)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, row_words in enumerate(words):
            for col, word in enumerate(row_words):
                txt[row, col] = torch.randn(
                    self.width, generator=torch.Generator().manual_seed(zlib.crc32(word.encode()))
                )
                mask[row, col] = True
        return {"txt": txt, "txt_mask": mask, "pooled": txt.sum(dim=1)}


def conditioner(**overrides) -> tuple[TextConditioner, WordHashEncoder]:
    encoder = WordHashEncoder()
    return TextConditioner(encoder, ConditioningConfig(**overrides)), encoder


def test_config_defaults_and_validation() -> None:
    config = ConditioningConfig()
    assert (config.caption_dropout, config.fake_prompt_prefix) == (0.1, "fake image, ")
    assert (config.t5_max_length, config.clip_max_length, config.pad_to_max_length) == (512, 77, True)
    for bad, match in [
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"caption_dropout": -0.1}, "caption_dropout"),
        ({"fake_prompt_prefix": "  "}, "fake_prompt_prefix"),
        ({"t5_max_length": 0}, "t5_max_length"),
        ({"clip_max_length": 1}, "clip_max_length"),
    ]:
        with pytest.raises(ValueError, match=match):
            ConditioningConfig(**bad)
    with pytest.raises(TypeError, match="pad_to_max_length"):
        ConditioningConfig(pad_to_max_length="yes")
    with pytest.raises(TypeError, match="encode"):
        TextConditioner(object())


def test_caption_dropout_rate_and_determinism() -> None:
    cond, _ = conditioner(caption_dropout=0.1)
    n = 20_000
    kept, dropped = cond.drop_captions(["a cat"] * n, torch.Generator().manual_seed(0))
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n), rate  # 5 sigma of the binomial
    assert [c == "" for c in kept] == dropped.tolist()
    _, again = cond.drop_captions(["a cat"] * n, torch.Generator().manual_seed(0))
    _, other = cond.drop_captions(["a cat"] * n, torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again) and not torch.equal(dropped, other)
    # The generator advances the same whatever the probability (never / always drop).
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    none_kept, none = conditioner(caption_dropout=0.0)[0].drop_captions(CAPTIONS, gens[0])
    _, all_dropped = conditioner(caption_dropout=1.0)[0].drop_captions(CAPTIONS, gens[1])
    assert none_kept == CAPTIONS and not none.any() and all_dropped.all()
    assert torch.equal(torch.rand(4, generator=gens[0]), torch.rand(4, generator=gens[1]))


def test_training_batch_with_fake_prompts() -> None:
    cond, encoder = conditioner(caption_dropout=0.5)
    out = cond.training_batch(CAPTIONS, torch.Generator().manual_seed(5), want_fake=True)
    assert set(out) == {"cond", "null", "fake", "dropped"}
    dropped = out["dropped"]
    assert dropped.shape == (6,) and dropped.dtype == torch.bool and 0 < dropped.sum() < 6  # seed 5 mixes
    used = ["" if d else c for c, d in zip(CAPTIONS, dropped.tolist())]
    # One encoder call: captions after dropout, then prefix + caption (the bare prefix when dropped).
    assert encoder.calls[0] == used + ["fake image, " + c for c in used]
    length = out["cond"]["txt"].shape[1]
    for name in ("cond", "null", "fake"):
        assert out[name]["txt"].shape == (6, length, 8) and out[name]["txt_mask"].shape == (6, length)
        assert out[name]["pooled"].shape == (6, 8)
    # The null condition is "" (one EOS token), and the dropped rows of cond are exactly it, so
    # cond = where(dropped, null, encode(captions)).
    assert out["null"]["txt_mask"].sum(dim=1).tolist() == [1] * 6
    for key in ("txt", "txt_mask", "pooled"):
        torch.testing.assert_close(out["cond"][key][dropped], out["null"][key][dropped])
        full = cond.encode(CAPTIONS)[key]
        if key != "pooled":  # pad to the batch length (the fake prompts are longer)
            full = torch.cat([full, full.new_zeros(6, length - full.shape[1], *full.shape[2:])], 1)
        select = dropped.view(-1, *[1] * (full.dim() - 1))
        torch.testing.assert_close(torch.where(select, out["null"][key], full), out["cond"][key])
    # The prefix adds tokens to every fake prompt.
    prefix_tokens = len("fake image, ".split())
    assert torch.equal(out["fake"]["txt_mask"].sum(1), out["cond"]["txt_mask"].sum(1) + prefix_tokens)


def test_no_fake_and_null_encoded_once() -> None:
    cond, encoder = conditioner()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = cond.training_batch(CAPTIONS, gen, want_fake=False)
        assert out["fake"] is None
    assert [len(call) for call in encoder.calls].count(6) == 3  # captions only, no fake prompts
    assert encoder.calls.count([""]) == 1
    assert cond.null_condition(2, 11)["txt"].shape == (2, 11, 8)
    assert encoder.calls.count([""]) == 1


def test_training_batch_deterministic_under_seed() -> None:
    first = conditioner()[0].training_batch(CAPTIONS * 4, torch.Generator().manual_seed(9), want_fake=True)
    second = conditioner()[0].training_batch(CAPTIONS * 4, torch.Generator().manual_seed(9), want_fake=True)
    assert torch.equal(first["dropped"], second["dropped"])
    for name in ("cond", "null", "fake"):
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key])


def test_bad_captions() -> None:
    cond, _ = conditioner()
    gen = torch.Generator()
    with pytest.raises(TypeError, match="list of strings"):
        cond.training_batch("a cat", gen, want_fake=False)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string"):
        cond.training_batch(["a cat", None], gen, want_fake=False)
    with pytest.raises(ValueError, match="empty"):
        cond.training_batch([], gen, want_fake=False)
    with pytest.raises(TypeError, match="generator"):
        cond.training_batch(["a cat"], 0, want_fake=False)


@pytest.mark.parametrize("pad_to_max_length", [True, False])
def test_with_tiny_t5_and_clip(snapshots: tuple[Path, Path], pad_to_max_length: bool) -> None:
    config = ConditioningConfig(caption_dropout=0.5, t5_max_length=32, pad_to_max_length=pad_to_max_length)
    cond = TextConditioner.from_snapshots(*snapshots, config, device="cpu")
    out = cond.training_batch(CAPTIONS, torch.Generator().manual_seed(5), want_fake=True)
    dropped = out["dropped"]
    assert 0 < dropped.sum() < 6
    tokens = cond.encoder.t5.tokenizer
    used = ["" if d else c for c, d in zip(CAPTIONS, dropped)]
    counts = torch.tensor([len(ids) for ids in tokens(used)["input_ids"]])
    prefix = len(tokens("fake image,")["input_ids"]) - 1  # without the EOS
    length = 32 if pad_to_max_length else int(counts.max()) + prefix
    for name in ("cond", "null", "fake"):
        assert out[name]["txt"].shape == (6, length, 32) and out[name]["pooled"].shape == (6, 32)
    assert torch.equal(out["cond"]["txt_mask"].sum(1), counts)
    assert torch.equal(out["fake"]["txt_mask"].sum(1), counts + prefix)
    for key in ("txt", "txt_mask", "pooled"):
        torch.testing.assert_close(out["cond"][key][dropped], out["null"][key][dropped])
    assert not torch.allclose(out["fake"]["pooled"], out["cond"]["pooled"])


def test_config_must_match_loaded_encoders(snapshots: tuple[Path, Path]) -> None:
    encoders = TextEncoders.from_snapshots(*snapshots, t5_max_length=32)
    with pytest.raises(ValueError, match="t5_max_length=512 but the encoders use 32"):
        TextConditioner(encoders, ConditioningConfig())
    matching = TextConditioner(encoders, ConditioningConfig(t5_max_length=32))
    assert matching.encode(["a cat"])["txt"].shape == (1, 32, 32)
