"""MFU against the device's own peak: the peak table, and the metrics logger with and without a peak."""

from __future__ import annotations

import json

import pytest

from selfe.flops import device_peak_flops, peak_flops_of
from selfe.train.metrics import MetricsLogger


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_flops_of(name) == peak


def test_no_peak_on_cpu():
    assert device_peak_flops("cpu") is None


@pytest.mark.parametrize("peak", [None, 2e12])
def test_mfu_only_against_a_known_peak(tmp_path, capsys, peak):
    logger = MetricsLogger(tmp_path, total_steps=1, log_every=1, peak_flops=peak, world_size=2)
    rates = logger.throughput(step_time=0.5, images=8, tokens=64, flops=4e12)
    assert rates["tflops_per_device"] == pytest.approx(4.0)  # 4e12 FLOPs in 0.5 s over 2 devices
    logger.log(1, {"loss": 1.0, **rates})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    line = capsys.readouterr().err
    if peak is None:
        assert "mfu" not in record and "MFU" not in line and "4 TFLOP/s" in line
    else:
        assert record["mfu"] == pytest.approx(4e12 / peak) and "MFU 200.0%" in line
