"""The trainer's batch sources: the fake prompts of the auxiliary term come from the objective's config."""

from __future__ import annotations

import torch

from selfe.train.config import apply_overrides, preset
from selfe.train.smoke_encoders import SmokeTextEncoder
from selfe.train.sources import build_source


def test_procedural_fake_prompts_use_the_configured_prefix() -> None:
    config = apply_overrides(preset("smoke"), ["data.num_samples=16", "data.batch_size=4", "data.text_length=8"])
    prefix = "generated picture: "
    source = build_source(config.data, config.model, 0, 1, 1, fake_prefix=prefix)
    captions = [source.captions[i] for i in source._indices(0)]  # the first step's samples
    (batch,) = source.next_step(want_fake=True)
    model, data = config.model, config.data
    encoder = SmokeTextEncoder(model.txt_dim, model.vec_dim, data.text_length, seed=data.seed)
    want_fake, want_bare = encoder([prefix + c for c in captions]), encoder([prefix])
    for key in ("txt", "txt_mask", "pooled"):
        torch.testing.assert_close(batch["fake_cond"][key], want_fake[key])
        torch.testing.assert_close(batch["fake_null_cond"][key], want_bare[key].expand_as(want_fake[key]))
    (off,) = source.next_step(want_fake=False)
    assert off["fake_cond"] is None and off["fake_null_cond"] is None


def test_the_prefix_is_an_objective_field() -> None:
    config = apply_overrides(preset("smoke"), ["objective.fake_prompt_prefix=synthetic, "])
    assert config.objective.fake_prompt_prefix == "synthetic, "
    assert preset("2b").objective.fake_prompt_prefix == "fake image, "  # SELFE.md's string
