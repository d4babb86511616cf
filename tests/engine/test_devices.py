"""`selfe.utils.devices`: the device check shared by the commands (`--device`) and the library (`device=`)."""

from __future__ import annotations

import pytest
import torch

from selfe.sampling.pipeline_inputs import checked_device
from selfe.utils.devices import device_problem, unavailable_reason


def test_cpu_is_usable() -> None:
    assert device_problem("cpu") is None and device_problem("cpu:0") is None
    assert checked_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("meta", "holds no data"),
        ("hpu", "not usable on this machine"),  # no torch.hpu module: the allocation is tried
        ("mps", "this torch has no MPS device"),
    ],
)
def test_unusable_devices_named_alike_in_commands_and_library(device: str, reason: str) -> None:
    assert reason in unavailable_reason(torch.device(device))
    assert device_problem(device).startswith(f"--device {device}: ") and reason in device_problem(device)
    with pytest.raises(ValueError, match=f"device='{device}': .*{reason}"):
        checked_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda() -> None:
    assert device_problem("cuda:1") == "--device cuda:1: this torch has no CUDA device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_past_the_last_device() -> None:
    count = torch.cuda.device_count()
    assert device_problem(f"cuda:{count}") == f"--device cuda:{count}: this machine has {count} CUDA device(s)"
    assert device_problem("cuda:0") is None


def test_not_a_device_name() -> None:
    assert device_problem("gpu") == "--device 'gpu' is not a torch device; use cpu, cuda or cuda:N"
