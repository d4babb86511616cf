"""StageTimings: seconds per stage of a sampling call, with no host sync on the way on CUDA."""

from __future__ import annotations

import time

import pytest
import torch

from selfe.sampling.stage_timings import StageTimings


def test_stages_add_up_and_only_finished_ones_are_keys() -> None:
    timings = StageTimings("cpu")
    timings.start("end_to_end")
    for _ in range(2):
        with timings("denoise"):
            time.perf_counter()
    assert list(timings) == ["denoise"] and len(timings) == 1  # end_to_end still open
    timings.stop("end_to_end")
    assert set(timings) == {"denoise", "end_to_end"}
    assert 0 < timings["denoise"] <= timings["end_to_end"]
    assert dict(timings) == {"denoise": timings["denoise"], "end_to_end": timings["end_to_end"]}
    with pytest.raises(RuntimeError, match="'decode' was not started"):
        timings.stop("decode")
    timings.start("decode")
    with pytest.raises(RuntimeError, match="'decode' is already being timed"):
        timings.start("decode")
    with pytest.raises(KeyError):
        timings["decode"]


@pytest.mark.gpu
def test_cuda_stages_are_timed_by_events_without_a_sync() -> None:
    timings = StageTimings("cuda")
    torch.cuda.synchronize()
    began = time.perf_counter()
    with timings("busy"):
        torch.cuda._sleep(200_000_000)  # a long kernel (~0.1 s on a 2 GHz clock): queued, not waited for
    queued = time.perf_counter() - began
    assert timings["busy"] > 2 * queued  # reading waits for the stage's last event; the stage did not
