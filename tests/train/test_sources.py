"""The trainer's batch sources: the fake prompts of the auxiliary term come from the objective's config; a
cache must be the manifest's and fit the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfe.train.cache import CacheConfig, build_cache
from selfe.train.cli import train_main
from selfe.train.config import DataSection, apply_overrides, preset
from selfe.train.data import ManifestConfig
from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder
from selfe.train.sources import build_source
from tests.helpers_data import make_procedural_dataset


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
    assert preset("2b").objective.fake_prompt_prefix == "fake image, "  # the method's string (docs/method.md)


def _cache_of(root, n: int, seed: int, text_dim: int = 32, pooled_dim: int = 16):
    """A one-resolution (32^2) cache of a new procedural manifest under root, by the smoke encoders."""
    data = make_procedural_dataset(root, n, seed=seed, sizes=((96, 96),))
    config = CacheConfig(resolutions=(32,), num_threads=0, checks=ManifestConfig(min_side=32))
    text = SmokeTextEncoder(text_dim, pooled_dim, max_length=8)
    build_cache(data.manifest, root / "cache", SmokeImageEncoder(), text, config, progress=False)
    return data


def _cache_data(data, cache_dir, source: str = "images") -> DataSection:
    return DataSection(
        source=source,
        manifest=str(data.manifest),
        cache_dir=str(cache_dir),
        encoders="smoke",
        resolution=32,
        min_side=32,
        batch_size=2,
    )


def test_a_cache_of_another_manifest_is_refused(tmp_path) -> None:
    """data.source=images reads data.cache_dir in place of the images only when it is that manifest's cache."""
    mine = _cache_of(tmp_path / "a", 4, seed=1)
    _cache_of(tmp_path / "b", 4, seed=2)
    model = preset("smoke").model
    source = build_source(_cache_data(mine, tmp_path / "a" / "cache"), model, 0, 1, 1)
    assert next(source.dataset)["latents"].shape == (2, 16, 4, 4)  # its own cache: read
    for kind in ("images", "cache"):
        with pytest.raises(
            ValueError, match=r"data\.cache_dir=.*b/cache.* data\.manifest=.*a/manifest.*another manifest"
        ):
            build_source(_cache_data(mine, tmp_path / "b" / "cache", kind), model, 0, 1, 1)


def test_a_cache_for_another_model_width_is_refused_at_start(tmp_path) -> None:
    """A `selfe cache --smoke` cache (text width 64) and the smoke model (txt_dim 32): one line naming both."""
    data = _cache_of(tmp_path, 4, seed=3, text_dim=64)
    model = preset("smoke").model
    with pytest.raises(ValueError, match=r"txt_dim 64 where model\.txt_dim=32") as err:
        build_source(_cache_data(data, tmp_path / "cache"), model, 0, 1, 1)
    assert "\n" not in str(err.value) and "pooled_dim" not in str(err.value)
    wider = dataclasses.replace(model, in_channels=8)
    with pytest.raises(ValueError, match=r"latent_channels 16 where model\.in_channels=8"):
        build_source(_cache_data(data, tmp_path / "cache"), wider, 0, 1, 1)


def test_selfe_train_on_a_cache_of_other_widths_exits_2_with_one_line(tmp_path, capsys) -> None:
    _cache_of(tmp_path, 4, seed=3, text_dim=64)
    argv = ["smoke", "data.source=cache", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"]
    assert train_main([*argv, "data.resolution=32", "data.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.txt_dim=32" in err and "txt_dim 64" in err


def test_the_procedural_order_refuses_another_grad_accum_naming_it() -> None:
    config = apply_overrides(preset("smoke"), ["data.num_samples=16", "data.batch_size=4"])
    state = build_source(config.data, config.model, 0, 1, 1).state_dict()
    with pytest.raises(ValueError, match=r"saved global batch 4, now 8 \(.*optim\.grad_accum\)"):
        build_source(config.data, config.model, 0, 1, 2).load_state_dict(state)


def test_cut_batch_text_fits_all_four_conditions_to_one_bucket() -> None:
    from selfe.train.sources import cut_batch_text

    def cond(length: int, real: list[int]) -> dict[str, torch.Tensor]:
        mask = torch.arange(length)[None, :] < torch.tensor(real)[:, None]
        return {
            "txt": torch.randn(len(real), length, 4) * mask[..., None],
            "txt_mask": mask,
            "pooled": torch.randn(len(real), 3),
        }

    batch = {"x0": torch.zeros(2, 1), "cond": cond(16, [3, 5]), "null_cond": cond(16, [0, 0]),
             "fake_cond": cond(32, [6, 2]), "fake_null_cond": cond(32, [1, 1]), "num_tokens": 4}  # fmt: skip
    out = cut_batch_text(batch, 2)  # the longest, 6 real tokens, fits in 8 (2, 4, 8)
    for key in ("cond", "null_cond", "fake_cond", "fake_null_cond"):
        assert out[key]["txt"].shape[1] == out[key]["txt_mask"].shape[1] == 8
        assert torch.equal(out[key]["txt"], batch[key]["txt"][:, :8]) and out[key]["pooled"] is batch[key]["pooled"]
    # a fake prompt encoded shorter than the captions is padded to their bucket
    longer = {**batch, "cond": cond(16, [12, 1]), "fake_cond": cond(8, [6, 2]), "fake_null_cond": cond(8, [1, 1])}
    padded = cut_batch_text(longer, 4)
    assert padded["fake_cond"]["txt"].shape[1] == 16 and not padded["fake_cond"]["txt_mask"][:, 8:].any()
    assert cut_batch_text(batch, None) is batch
    assert cut_batch_text({**batch, "fake_cond": None, "fake_null_cond": None}, 64)["cond"]["txt"].shape[1] == 16
