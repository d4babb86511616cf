"""The prefetch thread runs a batch source ahead: the same batches in the same order as the source alone, a
saved state that resumes at the next batch handed out (not the next one read ahead), errors raised at the step
they belong to, and a trainer that trains the same with or without it."""

from __future__ import annotations

import threading

import pytest
import torch

from selfe.train.cache import CacheConfig, build_cache
from selfe.train.config import DataSection, apply_overrides, preset
from selfe.train.data import ManifestConfig
from selfe.train.prefetch import Prefetcher
from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder
from selfe.train.sources import build_source, cut_batch_text
from selfe.train.trainer import Trainer
from tests.helpers_data import make_procedural_dataset
from tests.train.helpers_trainer import tiny_config

CPU = torch.device("cpu")


def _want_fake(iteration: int) -> bool:
    return iteration >= 3  # the auxiliary term switches on within the run


@pytest.fixture(params=["procedural", "cache"])
def make_source(request, tmp_path):
    """A factory of fresh, identical sources (a new one starts at the first batch)."""
    config = apply_overrides(preset("smoke"), ["data.num_samples=24", "data.batch_size=4", "data.text_length=8"])
    data = config.data
    if request.param == "cache":
        made = make_procedural_dataset(tmp_path, 24, sizes=((96, 96), (64, 128)))
        text = SmokeTextEncoder(config.model.txt_dim, config.model.vec_dim, max_length=8)
        cache = CacheConfig(resolutions=(32,), num_threads=0, checks=ManifestConfig(min_side=32))
        build_cache(made.manifest, tmp_path / "cache", SmokeImageEncoder(), text, cache, progress=False)
        data = DataSection(
            source="cache", cache_dir=str(tmp_path / "cache"), encoders="smoke", resolution=32, batch_size=2
        )
    return lambda: build_source(data, config.model, 0, 1, 2, CPU)  # grad_accum 2: two micro-batches a step


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _cut(batch):
    return cut_batch_text(batch, 2)


def test_the_same_batches_in_the_same_order(make_source):
    bare, ahead = make_source(), Prefetcher(make_source(), CPU, _want_fake, _cut, depth=3)
    try:
        for iteration in range(8):
            expected = [_cut(b) for b in bare.next_step(_want_fake(iteration))]
            _assert_same(ahead.next_step(iteration), expected)
    finally:
        ahead.close()


def test_a_resume_lands_on_the_next_batch_handed_out(make_source):
    """The thread has read ahead when the state is taken; a new prefetcher loaded with it continues exactly
    where the consumer stopped, as the source alone would."""
    bare, first = make_source(), Prefetcher(make_source(), CPU, _want_fake, depth=3)
    try:
        for iteration in range(4):
            _assert_same(first.next_step(iteration), bare.next_step(_want_fake(iteration)))
        state = first.state_dict()
        assert state == bare.state_dict()
    finally:
        first.close()
    resumed = Prefetcher(make_source(), CPU, _want_fake, depth=3)
    resumed.load_state_dict(state)
    try:
        for iteration in range(4, 9):
            _assert_same(resumed.next_step(iteration), bare.next_step(_want_fake(iteration)))
    finally:
        resumed.close()


class _Failing:
    """A source whose step 2 fails (a read error in the middle of the data)."""

    def __init__(self):
        self.steps = 0

    def next_step(self, want_fake: bool):
        if self.steps == 2:
            raise OSError("shard-3.safetensors: read error")
        self.steps += 1
        return [{"x0": torch.full((1,), float(self.steps))}]

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_an_error_is_raised_at_its_step_and_the_thread_ends():
    ahead = Prefetcher(_Failing(), CPU, _want_fake, depth=2)
    assert ahead.next_step(0)[0]["x0"].item() == 1.0
    assert ahead.next_step(1)[0]["x0"].item() == 2.0
    with pytest.raises(OSError, match="read error"):
        ahead.next_step(2)
    assert not any(t.name == "selfe-prefetch" for t in threading.enumerate())
    assert ahead.state_dict() == {"steps": 2}
    with pytest.raises(ValueError, match="in order: asked for 5, next is 2"):
        ahead.next_step(5)


def test_nothing_is_read_past_the_end():
    source = _Failing()
    ahead = Prefetcher(source, CPU, _want_fake, depth=4, stop_at=1)
    ahead.next_step(0)
    ahead.close()
    assert source.steps == 1  # the thread stopped at stop_at, it did not read ahead into the failure


@pytest.mark.slow
def test_the_trainer_trains_the_same_with_and_without_prefetch(tmp_path):
    def losses(name: str, depth: int) -> list[float]:
        trainer = Trainer(tiny_config(tmp_path / name, 4, f"data.prefetch_steps={depth}"))
        try:
            return trainer.train().losses
        finally:
            trainer.close()

    assert losses("ahead", 3) == losses("inline", 0)


@pytest.mark.gpu
def test_pinned_side_stream_copies_train_like_inline_ones(tmp_path):
    def losses(name: str, depth: int) -> list[float]:
        trainer = Trainer(tiny_config(tmp_path / name, 4, "device=cuda", f"data.prefetch_steps={depth}"))
        try:
            return trainer.train().losses
        finally:
            trainer.close()

    # the same batches; a GPU's attention backward may add in another order, so not bit for bit
    torch.testing.assert_close(torch.tensor(losses("ahead", 2)), torch.tensor(losses("inline", 0)), rtol=2e-3, atol=0)
