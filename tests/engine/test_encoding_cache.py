"""Kept prompt encodings: TextEncoders' LRU of recent prompts, its negative prompts, and PromptEncodingCache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfe.components.encoding_cache import PromptEncodingCache
from selfe.components.text_encoders import NEGATIVE_CACHE_SIZE, TextEncoders

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

L = 64
BUCKET = 4


def counted(encoders: TextEncoders) -> list[list[str]]:
    """The prompt batches T5 and CLIP actually encode, recorded per call (both run together)."""
    calls: list[list[str]] = []
    t5_encode = encoders.t5.encode

    def record(prompts, **kwargs):
        calls.append(list(prompts))
        return t5_encode(prompts, **kwargs)

    encoders.t5.encode = record
    return calls


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", [dict(bucket=BUCKET), dict(length=L), dict()])
def test_hits_equal_fresh_encodings_and_skip_the_encoder(snapshots: tuple[Path, Path], how: dict) -> None:
    plain = TextEncoders.from_snapshots(*snapshots, t5_max_length=L)
    kept = TextEncoders.from_snapshots(*snapshots, t5_max_length=L, prompt_cache_size=8)
    calls = counted(kept)
    first = ["a photo of a cat", "a red dog on the table, photo of the dog"]
    assert_same(kept.encode(first, **how), plain.encode(first, **how))
    assert calls == [first] and kept.prompt_cache.misses == 2 and kept.prompt_cache.hits == 0
    # Hits alone, in another order and batch: the encoder is not called, the answer is the same.
    again = [first[1], first[0], first[1]]
    assert_same(kept.encode(again, **how), plain.encode(again, **how))
    assert calls == [first] and kept.prompt_cache.hits == 3
    # A mix: only the new prompt (once, though given twice) is encoded; the batch length is the longest's.
    mixed = ["zebra!", first[0], "zebra!"]
    out = kept.encode(mixed, **how)
    assert calls == [first, ["zebra!"]]
    assert_same(out, plain.encode(mixed, **how))


def test_eviction_at_the_bound_least_recent_first(snapshots: tuple[Path, Path]) -> None:
    kept = TextEncoders.from_snapshots(*snapshots, t5_max_length=L, prompt_cache_size=2)
    calls = counted(kept)
    for prompt in ("one", "two"):
        kept.encode([prompt], bucket=BUCKET)
    kept.encode(["one"], bucket=BUCKET)  # "one" is now the most recent
    kept.encode(["three"], bucket=BUCKET)  # evicts "two"
    assert len(kept.prompt_cache) == 2
    kept.encode(["one", "three"], bucket=BUCKET)
    assert calls == [["one"], ["two"], ["three"]]
    kept.encode(["two"], bucket=BUCKET)
    assert calls[-1] == ["two"]


def test_callers_cannot_corrupt_the_cache(snapshots: tuple[Path, Path]) -> None:
    kept = TextEncoders.from_snapshots(*snapshots, t5_max_length=L, prompt_cache_size=4)
    want = {k: v.clone() for k, v in kept.encode(["a cat"], bucket=BUCKET).items()}
    for _ in range(2):  # the answer of a miss and of a hit
        out = kept.encode(["a cat"], bucket=BUCKET)
        out["txt"].fill_(7.0)
        out["pooled"].zero_()
        out["txt_mask"].fill_(False)
    assert_same(kept.encode(["a cat"], bucket=BUCKET), want)


def test_keys_hold_the_length_rule_dtype_and_device(snapshots: tuple[Path, Path]) -> None:
    kept = TextEncoders.from_snapshots(*snapshots, t5_max_length=L, prompt_cache_size=8)
    calls = counted(kept)
    kept.encode(["a cat"], bucket=BUCKET)
    kept.encode(["a cat"], length=L)
    kept.encode(["a cat"], length=8)
    assert len(calls) == 3
    kept.t5.model.to(torch.float64)  # another dtype is another key, not a stale hit
    assert kept.encode(["a cat"], length=8)["txt"].dtype == torch.float64 and len(calls) == 4


def test_off_by_default_and_for_t5_without_its_mask_unpadded(snapshots: tuple[Path, Path]) -> None:
    plain = TextEncoders.from_snapshots(*snapshots, t5_max_length=L)
    calls = counted(plain)
    plain.encode(["a cat"])
    plain.encode(["a cat"])
    assert len(calls) == 2 and len(plain.prompt_cache) == 0
    # Without its mask T5's real states depend on the padding: unpadded rows are never kept.
    unmasked = TextEncoders.from_snapshots(
        *snapshots, t5_max_length=L, t5_attention_mask=False, pad_to_max_length=False, prompt_cache_size=4
    )
    calls = counted(unmasked)
    unmasked.encode(["a cat"])
    unmasked.encode(["a cat"])
    assert len(calls) == 2 and len(unmasked.prompt_cache) == 0


def test_negative_prompts_are_kept_without_a_prompt_cache(snapshots: tuple[Path, Path]) -> None:
    encoders = TextEncoders.from_snapshots(*snapshots, t5_max_length=L)
    calls = counted(encoders)
    want = encoders.encode(["blurry, low quality"], bucket=BUCKET)
    for _ in range(3):
        assert_same(encoders.encode_negative(["blurry, low quality"], bucket=BUCKET), want)
    assert len(calls) == 2 and encoders.negative_cache.capacity == NEGATIVE_CACHE_SIZE
    encoders.to("cpu")  # a move forgets the kept encodings
    assert len(encoders.negative_cache) == 0


def test_capacity_is_checked() -> None:
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="capacity must be an integer >= 0"):
            PromptEncodingCache(bad)
