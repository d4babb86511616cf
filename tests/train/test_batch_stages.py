"""The paper's batch change at a stage boundary (data.batch_stages) within one run: the data order starts a
new stage, and a resume on either side of the change trains what the uninterrupted run does."""

from __future__ import annotations

import pytest
import torch

from selfe.train.config import apply_overrides, preset
from selfe.train.trainer import Trainer
from tests.helpers_data import make_procedural_dataset
from tests.train.helpers_trainer import read_metrics, tiny_config

pytestmark = pytest.mark.slow


def _run(config):
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from selfe.train.cache import build_cache
    from selfe.train.cache_shards import CacheConfig
    from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder

    root = tmp_path_factory.mktemp("stages")
    data = make_procedural_dataset(root / "data", 24, sizes=((64, 64),))
    base = tiny_config(root / "unused", 1)
    build_cache(
        data.manifest,
        root / "cache",
        SmokeImageEncoder(base.model.in_channels),
        SmokeTextEncoder(base.model.txt_dim, base.model.vec_dim, base.data.text_length),
        CacheConfig(resolutions=(32,), shard_size=8, num_threads=0),
        progress=False,
    )
    return root / "cache"


def test_batch_stages_resume_on_either_side_of_the_change(tmp_path, cache_dir) -> None:
    def config(name: str, steps: int):
        return tiny_config(
            tmp_path / name, steps, "data.source=cache", f"data.cache_dir={cache_dir}", "data.resolution=32",
            "data.batch_stages=3:2", "checkpoint.every=0",
        )  # fmt: skip

    _run(config("whole", 6))
    whole = read_metrics(tmp_path / "whole")
    flops = [r["executed_tflops_per_step"] for r in whole]  # useful FLOPs follow each batch's captions
    assert flops[0] == flops[2] and flops[3] == flops[5] == pytest.approx(flops[0] / 2)  # batch 4, then 2
    assert [r["images_per_s"] * r["step_time"] for r in whole] == pytest.approx([4, 4, 4, 2, 2, 2])
    for name, first_leg in (("before", 2), ("after", 5)):  # checkpoints before and after the change
        _run(config(name, first_leg))
        _run(config(name, 6))
        resumed = [r["loss"] for r in read_metrics(tmp_path / name)]
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor([r["loss"] for r in whole]), rtol=0, atol=1e-6)


def test_batch_stages_are_checked() -> None:
    assert preset("2b").data.batch_size_at(499_999) == 16 and preset("2b").data.batch_size_at(500_000) == 12
    with pytest.raises(ValueError, match="increasing"):
        apply_overrides(preset("2b"), ["data.batch_stages=5:2,3:4"])
    with pytest.raises(ValueError, match="cache, images"):
        apply_overrides(preset("smoke"), ["data.batch_stages=3:2"])
