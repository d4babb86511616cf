"""Deterministic, resumable, sharded batch order."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from selfe.train.data import (
    BucketBatchSampler,
    BucketConfig,
    ImageTextLoader,
    LoaderConfig,
    ManifestConfig,
    ResolutionSchedule,
    scan_manifest,
)
from tests.helpers_data import make_image, make_procedural_dataset

SCHEDULE = ResolutionSchedule(stages=[(0, {32: 1.0}), (3, {32: 0.5, 48: 0.5})])


def _classes(n=103, k=4, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


def _plans(sampler, count):
    return [next(sampler) for _ in range(count)]


def test_sampler_is_a_pure_function_of_seed_epoch_position():
    classes = _classes()
    a = BucketBatchSampler(classes, 4, seed=5, schedule=SCHEDULE)
    b = BucketBatchSampler(classes, 4, seed=5, schedule=SCHEDULE)
    plans = _plans(a, 3 * a.batches_per_epoch + 2)
    assert plans == _plans(b, len(plans))
    assert plans[7] == b.plan(plans[7].epoch, plans[7].position)
    c = BucketBatchSampler(classes, 4, seed=6, schedule=SCHEDULE)
    assert [p.indices for p in _plans(c, 10)] != [p.indices for p in plans[:10]]
    # A new permutation every epoch; each batch holds one class.
    epoch0 = [p.indices for p in a.iter_epoch(0)]
    epoch1 = [p.indices for p in a.iter_epoch(1)]
    assert epoch0 != epoch1
    for p in plans:
        assert len(set(classes[list(p.indices)])) == 1 and len(p.indices) == 4
        assert classes[p.indices[0]] == p.aspect_class


@pytest.mark.parametrize("world_size", [1, 3])
def test_sharding_drop_disjoint_same_count(world_size):
    classes = _classes(n=211, k=5, seed=1)
    samplers = [BucketBatchSampler(classes, 4, seed=2, rank=r, world_size=world_size) for r in range(world_size)]
    counts = {s.batches_per_epoch for s in samplers}
    assert len(counts) == 1
    for epoch in (0, 1):
        per_rank = [[p for p in s.iter_epoch(epoch)] for s in samplers]
        assert len({len(p) for p in per_rank}) == 1
        # Same step -> same bucket on every rank.
        for step_plans in zip(*per_rank):
            assert len({p.aspect_class for p in step_plans}) == 1
        seen = [i for plans in per_rank for p in plans for i in p.indices]
        assert len(seen) == len(set(seen))  # disjoint, no sample twice
        # Only each class's remainder (< one global batch) is left out.
        _, sizes = np.unique(classes, return_counts=True)
        dropped = int(sum(n % (4 * world_size) for n in sizes))
        assert len(seen) == len(classes) - dropped


def test_sharding_pad_covers_everything():
    classes = _classes(n=50, k=3, seed=3)
    samplers = [BucketBatchSampler(classes, 4, seed=0, rank=r, world_size=2, remainder="pad") for r in range(2)]
    seen = [i for s in samplers for p in s.iter_epoch(0) for i in p.indices]
    assert set(seen) == set(range(50))
    assert len(seen) == samplers[0].batches_per_epoch * 8
    assert len(seen) - 50 < 3 * 8  # at most one padded global batch per class


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"no full global batch.*lower the per-rank batch size \(data\.batch_size\)"):
        BucketBatchSampler([0, 0, 1], 4)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([0] * 8, 2, rank=2, world_size=2)
    sampler = BucketBatchSampler(_classes(), 4)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        BucketBatchSampler(_classes(n=99), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="remainder"):
        BucketBatchSampler(_classes(), 4, remainder="pad").load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("step", "iteration", "stage")}  # before stages existed
    with pytest.raises(ValueError, match="predates stages"):
        BucketBatchSampler(_classes(), 2).load_state_dict(old)


def test_a_new_batch_size_starts_a_stage_that_keeps_counting_iterations():
    """The paper's 1024 -> 768 change at 500k, in small: 4 x 1 with 2 batches per step, then 3 x 2 ranks."""
    classes = _classes()
    first = BucketBatchSampler(classes, 4, seed=9, schedule=SCHEDULE, batches_per_step=2)
    head = _plans(first, 30)  # 15 iterations, in the middle of epoch 1
    assert head[-1].epoch == 1 and first.position > 0
    state = copy.deepcopy(first.state_dict())
    assert (state["step"], state["iteration"]) == (30, 15)

    ranks = [BucketBatchSampler(classes, 3, seed=0, rank=r, world_size=2, schedule=SCHEDULE) for r in range(2)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    plans = [_plans(sampler, 8) for sampler in ranks]
    for r, rank_plans in enumerate(plans):
        assert [(p.epoch, p.position) for p in rank_plans[:2]] == [(2, 0), (2, 1)]  # the next whole epoch
        assert [p.step for p in rank_plans] == list(range(30, 38))  # one batch per iteration now
        assert all(len(p.indices) == 3 for p in rank_plans)
        fresh = BucketBatchSampler(classes, 3, seed=9, rank=r, world_size=2, schedule=SCHEDULE)
        fresh_epoch = list(fresh.iter_epoch(2))[:8]
        assert [p.indices for p in rank_plans] == [p.indices for p in fresh_epoch]  # the ordinary epoch-2 batches
    # The schedule reads the continued iteration (15, 16, ...), not one restarted at 0: both ranks agree,
    # and the draws equal those of a schedule asked for those iterations directly.
    expected = [SCHEDULE.resolution_at(15 + k, 9) for k in range(8)]
    assert [p.resolution for p in plans[0]] == [p.resolution for p in plans[1]] == expected
    assert set(plans[0][0].indices).isdisjoint(plans[1][0].indices)

    # Inside the new stage, resume is exact again.
    state2 = copy.deepcopy(ranks[0].state_dict())
    again = BucketBatchSampler(classes, 3, seed=0, rank=0, world_size=2, schedule=SCHEDULE)
    again.load_state_dict(state2)
    more = _plans(ranks[0], 5)
    assert _plans(again, 5) == more and more[0].step == 38


def test_a_new_batches_per_step_keeps_the_batches_and_the_iteration_count():
    """optim.grad_accum 2 -> 3 on resume: the same batches follow, grouped 3 to an iteration from the saved
    iteration on (it was recounted as step // 3 from the start, moving the resolution schedule back)."""
    classes = _classes()
    first = BucketBatchSampler(classes, 4, seed=9, schedule=SCHEDULE, batches_per_step=2)
    _plans(first, 30)  # 15 iterations, in the middle of epoch 1
    state = copy.deepcopy(first.state_dict())
    uninterrupted = _plans(first, 12)
    resumed = BucketBatchSampler(classes, 4, seed=9, schedule=SCHEDULE, batches_per_step=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["iteration"] == 15
    plans = _plans(resumed, 12)
    assert [(p.epoch, p.position, p.indices, p.step) for p in plans] == [
        (p.epoch, p.position, p.indices, p.step) for p in uninterrupted
    ]  # no batch skipped or repeated
    assert [p.resolution for p in plans] == [SCHEDULE.resolution_at(15 + k // 3, 9) for k in range(12)]
    assert resumed.state_dict()["iteration"] == 19
    # Inside the new stage (across an epoch boundary too), resume is exact again.
    again = BucketBatchSampler(classes, 4, seed=0, schedule=SCHEDULE, batches_per_step=3)
    again.load_state_dict(copy.deepcopy(resumed.state_dict()))
    count = 2 * resumed.batches_per_epoch
    assert _plans(again, count) == _plans(resumed, count)


def test_sampler_resume():
    classes = _classes()
    full = BucketBatchSampler(classes, 4, seed=9, schedule=SCHEDULE)
    expected = _plans(full, 60)
    first = BucketBatchSampler(classes, 4, seed=9, schedule=SCHEDULE)
    head = _plans(first, 37)  # crosses an epoch boundary (batches_per_epoch < 37)
    assert first.batches_per_epoch < 37
    state = copy.deepcopy(first.state_dict())
    resumed = BucketBatchSampler(classes, 4, seed=0, schedule=SCHEDULE)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert head + _plans(resumed, 23) == expected


def _dataset_with_a_bad_image(tmp_path):
    data = make_procedural_dataset(tmp_path, 20, seed=2, sizes=((96, 96), (128, 64), (64, 128)))
    img, _ = make_image(96, 96, 1)
    img.save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    with open(data.manifest, "a") as f:
        f.write("truncated.png\ta truncated image\n")
    return data


def _loader(tmp_path, num_threads, rank=0, world_size=1):
    manifest = scan_manifest(tmp_path / "manifest.tsv", tmp_path, ManifestConfig(min_side=32))
    config = LoaderConfig(batch_size=2, seed=4, num_threads=num_threads, prefetch_batches=3)
    return ImageTextLoader(manifest, BucketConfig(), SCHEDULE, config, rank, world_size)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return a["indices"] == b["indices"] and a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])


def test_loader_resume_equals_uninterrupted_run(tmp_path):
    _dataset_with_a_bad_image(tmp_path)
    reference = _loader(tmp_path, num_threads=0)
    expected = _take(reference, 16)
    assert reference.batches_per_epoch < 11  # the interrupted run stops in its second epoch
    # Interrupted run, with threads and prefetch: 11 batches, save, throw away, rebuild, load, continue.
    first = _loader(tmp_path, num_threads=2)
    head = _take(first, 11)
    state = copy.deepcopy(first.state_dict())
    first.close()
    del first
    resumed = _loader(tmp_path, num_threads=2)
    resumed.load_state_dict(state)
    tail = _take(resumed, 5)
    assert len(head + tail) == len(expected)
    assert all(_same(a, b) for a, b in zip(head + tail, expected))
    assert resumed.stats.as_dict() == reference.stats.as_dict()
    assert reference.stats.as_dict()["undecodable_image"] == 1
    shapes = {tuple(b["images"].shape[-2:]) for b in expected}
    assert {(32, 32), (48, 48)} <= shapes  # the schedule mixed resolutions
    resumed.close()


def test_loader_shards_are_disjoint(tmp_path):
    make_procedural_dataset(tmp_path, 24, seed=5, sizes=((96, 96), (128, 64)))
    loaders = [_loader(tmp_path, num_threads=0, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 6
    seen = [[i for b in loader.iter_epoch(0) for i in b["indices"]] for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(24))
