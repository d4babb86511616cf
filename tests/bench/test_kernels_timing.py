"""bench/kernels.py times an op's kernels, not the host's time to queue them, and reports that apart."""

from __future__ import annotations

import time

import pytest
import torch

from bench import kernels


def test_the_gpu_sleeps_longer_than_the_host_queues_up_to_a_cap() -> None:
    assert kernels.cover_cycles(1e-3, 2e9) == int(kernels.COVER_MARGIN * 1e-3 * 2e9) > 1e-3 * 2e9
    assert kernels.cover_cycles(10.0, 2e9) == int(kernels.MAX_COVER_S * 2e9)  # an fn that syncs inside
    assert kernels.cover_cycles(0.0, 2e9) == 0


def test_on_cpu_both_times_are_the_wall_clock() -> None:
    calls = []
    timing = kernels.time_fn(lambda: calls.append(1), warmup=2, iters=5, device=torch.device("cpu"))
    assert len(calls) == 7 and timing.kernel_s == timing.host_s > 0


def test_cpu_smoke_rows_carry_the_host_time(capsys) -> None:
    args = kernels.parse_args(["--cpu-smoke", "--only", "energy", "--no-attention"])
    result = kernels.run(args)
    assert result["rows"] and all(row["host ms"] > 0 for row in result["rows"])
    assert "| op | impl | ms | host ms |" in kernels.markdown(result)


@pytest.mark.gpu
def test_host_time_is_hidden_from_the_kernel_time() -> None:
    device = torch.device("cuda")
    x = torch.zeros(1024, device=device)

    def slow_host_tiny_kernel() -> None:  # ~3 ms of Python before a ~5 us kernel, as autograd adds to an op
        end = time.perf_counter() + 3e-3
        while time.perf_counter() < end:
            pass
        x.add_(1)

    timing = kernels.time_fn(slow_host_tiny_kernel, warmup=2, iters=10, device=device)
    assert timing.host_s > 2.5e-3
    assert timing.kernel_s < 0.5e-3, f"the events timed the host: {timing}"  # the 1 GiB flush alone covers ~0.3 ms
