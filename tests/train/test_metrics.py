"""MFU against the device's own peak: the peak table, its default, and the metrics logger's records and line."""

from __future__ import annotations

import json

import pytest

from selfe.network.flops import DEFAULT_PEAK_FLOPS, device_peak_flops, peak_flops_of
from selfe.train.metrics import MetricsLogger


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_flops_of(name) == peak


def test_unlisted_device_falls_back_to_the_h100_peak():
    assert device_peak_flops("cpu") == DEFAULT_PEAK_FLOPS == 989e12


def test_records_and_progress_line_carry_tflops_and_mfu(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=1, log_every=1, peak_flops=2e12, world_size=2)
    rates = logger.throughput(step_time=0.5, images=8, tokens=64, flops=4e12)
    assert rates["tflops_per_device"] == pytest.approx(4.0)  # 4e12 FLOPs in 0.5 s over 2 devices
    assert rates["mfu"] == pytest.approx(2.0)
    logger.log(1, {"loss": 1.0, **rates})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["mfu"] == pytest.approx(2.0)
    line = capsys.readouterr().err
    assert "| 4 TFLOP/s | MFU 200.0% |" in line


def test_a_window_logged_at_once_reports_its_steps_own_rate(tmp_path, capsys):
    """The trainer logs a window of steps at its log step, microseconds apart: the first line's rate comes
    from their step times (0.5 s each: 2 it/s), not from the moment they were written (thousands of it/s)."""
    logger = MetricsLogger(tmp_path, total_steps=100, log_every=50, peak_flops=None, world_size=1)
    for step in range(1, 51):
        logger.log(step, {"loss": 1.0, "step_time": 0.5})
    logger.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "| 2.00 it/s |" in line and "ETA 0:00:25" in line, line
