"""The training step reads nothing back from the device: every host read (Tensor.item, tolist, float, int,
bool, index, torch.cuda.synchronize) made by the training thread is counted, and only log steps may make one.
A non-finite step is skipped on the device (fused AdamW's found_inf), and a stop request waits for a log step."""

from __future__ import annotations

import signal
import threading
from collections import Counter

import pytest
import torch

from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import read_metrics, tiny_config

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Counts of the training thread's host reads, by name (the prefetch thread's data work is not counted)."""
    counts: Counter = Counter()

    def counting(name, original):
        def wrapper(*args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("synchronize", torch.cuda.synchronize))
    return counts


def _run(trainer: Trainer):
    try:
        return trainer.train()
    finally:
        trainer.close()


@pytest.mark.slow
def test_only_log_steps_read_the_device(tmp_path, host_reads):
    steps, every = 12, 4
    config = tiny_config(
        tmp_path, steps, "optim.implementation=fused", f"metrics.log_every={every}", "checkpoint.export_at_end=false"
    )
    trainer = Trainer(config)
    per_step, per_log = [], []

    def counted(method, into):
        def call():
            before = sum(host_reads.values())
            out = method()
            into.append(sum(host_reads.values()) - before)
            return out

        return call

    trainer.train_step = counted(trainer.train_step, per_step)
    trainer.log_metrics = counted(trainer.log_metrics, per_log)
    host_reads.clear()
    result = _run(trainer)
    assert result.step == steps and len(result.losses) == steps
    assert per_step == [0] * steps, host_reads
    assert len(per_log) == steps // every and all(n == 1 for n in per_log), per_log  # one tolist each
    # N steps cost N / log_every reads; the final checkpoint (DCP copies the state out) is not a step
    assert sum(per_step) + sum(per_log) == steps // every
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # every step logged, read in windows
    assert all(r["step_time"] > 0 and r["grad_norm"] > 0 for r in records)


@pytest.mark.slow
def test_fused_adamw_skips_a_poisoned_step_on_the_device(tmp_path):
    """The NaN step changes no weight, no moment, no step count and no EMA weight, and is counted."""
    config = tiny_config(tmp_path, 4, "optim.implementation=fused", "fault.inject_nan_steps=2")
    trainer = Trainer(config)
    snapshots = {}

    def state(t: Trainer) -> list[torch.Tensor]:
        tensors = [p.detach().full_tensor().clone() for p in t.model.parameters()]
        tensors += [p.detach().full_tensor().clone() for p in t.ema.model.parameters()]
        for per_param in t.optimizer.state.values():
            tensors += [v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone() for v in per_param.values()]
        return tensors

    original = trainer.train_step

    def step():
        if trainer.step in (2, 3):
            snapshots[trainer.step] = state(trainer)
        original()

    trainer.train_step = step
    result = _run(trainer)
    assert result.skipped == 1 and [r["skipped"] for r in read_metrics(tmp_path)] == [False, False, True, False]
    assert len(snapshots[2]) == len(snapshots[3])
    for before, after in zip(snapshots[2], snapshots[3]):
        assert torch.equal(before, after)


@pytest.mark.slow
def test_a_stop_request_is_taken_at_the_next_log_step(tmp_path):
    config = tiny_config(tmp_path, 20, "metrics.log_every=4")
    trainer = Trainer(config)
    original = trainer.train_step

    def step():
        original()
        if trainer.step == 1:
            trainer._on_signal(signal.SIGTERM, None)

    trainer.train_step = step
    result = _run(trainer)
    assert result.stopped_by_signal and result.step == 4
    assert result.checkpoint is not None and result.checkpoint.name == f"step_{4:09d}"
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.gpu
def test_cuda_steps_make_no_synchronizing_call(tmp_path):
    """On the GPU, torch's own sync detector: no step between log steps waits for the device."""
    import warnings

    trainer = Trainer(tiny_config(tmp_path, 8, "device=cuda", "metrics.log_every=4"))  # fused AdamW on CUDA
    try:
        for _ in range(2):  # the first steps set up cuBLAS, the allocator, the prefetch stream
            trainer.train_step()
        trainer.log_metrics()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(2):
                    trainer.train_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert not syncs, syncs
        assert len(trainer.log_metrics()) == 2
    finally:
        trainer.close()
