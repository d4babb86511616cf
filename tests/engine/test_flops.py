"""Useful against executed FLOPs (selfe.network.flops.forward_flops): MFU is taken on the real text only."""

from __future__ import annotations

import pytest
import torch

from selfe.network.config import mmdit_preset
from selfe.network.flops import (
    ForwardFlops,
    forward_flops,
    mmdit_forward_flops,
    text_length_polynomial,
    useful_forward_flops,
)


@pytest.mark.parametrize("preset", ["tiny", "2b"])
def test_a_short_prompt_counts_its_own_tokens_not_the_bucket(preset: str) -> None:
    config = mmdit_preset(preset)
    got = forward_flops(config, img_tokens=1024, txt_lengths=[10], executed_txt_tokens=512)
    assert got.useful == mmdit_forward_flops(config, 1, 1024, 10)
    assert got.executed == mmdit_forward_flops(config, 1, 1024, 512)
    assert got.useful < got.executed and 0 < got.useful_share < 1


def test_cfg_rows_count_each_at_its_real_length() -> None:
    config = mmdit_preset("tiny")
    # batch 2 with CFG: two prompts of 9 and 5 tokens, then the null prompt's rows (EOS alone)
    got = forward_flops(config, img_tokens=64, txt_lengths=[9, 5, 1, 1], executed_txt_tokens=16)
    one = lambda n: mmdit_forward_flops(config, 1, 64, n)  # noqa: E731
    assert got.useful == one(9) + one(5) + 2 * one(1)
    assert got.executed == mmdit_forward_flops(config, 4, 64, 16) == 4 * one(16)


def test_no_padding_means_useful_equals_executed() -> None:
    config = mmdit_preset("tiny")
    got = forward_flops(config, img_tokens=64, txt_lengths=[16, 16], executed_txt_tokens=16)
    assert got == ForwardFlops(mmdit_forward_flops(config, 2, 64, 16), mmdit_forward_flops(config, 2, 64, 16))
    assert got.useful_share == 1.0
    assert 3 * got == got + got + got == ForwardFlops(3 * got.useful, 3 * got.executed)


@pytest.mark.parametrize("preset", ["tiny", "2b"])
def test_the_mask_count_is_the_per_row_count_exactly(preset: str) -> None:
    config = mmdit_preset(preset)
    a, b, c = text_length_polynomial(config, 1024)
    for n in (0, 1, 7, 64, 512):
        assert a + b * n + c * n * n == mmdit_forward_flops(config, 1, 1024, n)
    lengths = [10, 1, 64, 0]
    mask = torch.arange(64)[None, :] < torch.tensor(lengths)[:, None]
    got = useful_forward_flops(config, 1024, mask)
    assert got.dtype == torch.int64 and got.dim() == 0
    expected = forward_flops(config, img_tokens=1024, txt_lengths=lengths, executed_txt_tokens=64)
    assert int(got) == expected.useful


@pytest.mark.parametrize(
    ("lengths", "executed", "message"),
    [
        ([], 8, "at least one row"),
        ([9], 8, r"txt_lengths must be ints in \[0, executed_txt_tokens=8\], got 9"),
        ([-1], 8, "got -1"),
        ([2.0], 8, "got 2.0"),
        ([2], -1, "executed_txt_tokens must be an int >= 0"),
    ],
)
def test_bad_arguments_are_named(lengths: list, executed: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        forward_flops(mmdit_preset("tiny"), img_tokens=64, txt_lengths=lengths, executed_txt_tokens=executed)
    with pytest.raises(ValueError, match=r"txt_mask must be \(B, L\)"):
        useful_forward_flops(mmdit_preset("tiny"), 64, torch.ones(3, dtype=torch.bool))
