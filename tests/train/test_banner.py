"""The start-up banner and MFU where no peak is known: n/a on a CPU, in the banner, the records and the line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from selfe.train.banner import nominal_step_flops
from selfe.train.metrics import MetricsLogger
from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import tiny_config


def test_mfu_is_not_available_without_a_peak(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, total_steps=1, log_every=1, peak_flops=None, world_size=1)
    rates = logger.throughput(step_time=0.5, images=8, tokens=64, flops=4e12)
    assert rates["mfu"] is None and rates["tflops_per_device"] == pytest.approx(8.0)
    logger.log(1, {"loss": 1.0, **rates})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] is None
    assert "| 8 TFLOP/s | MFU n/a |" in capsys.readouterr().err


@pytest.mark.slow
def test_the_banner_says_what_runs_and_its_flops_are_a_steps(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, 1))
    try:
        banner = trainer.banner()
        trainer.plan = dataclasses.replace(trainer.plan, est_peak_bytes=int(12.5 * 2**30))  # as a GPU's plan
        estimated = trainer.banner()
        trainer.train_step()
        (record,) = trainer.log_metrics()
    finally:
        trainer.close()
    parameters = sum(p.numel() for p in trainer.model.parameters())
    for part in (
        f"{parameters / 1e6:.2f}M parameters",
        "1 x cpu (world size 1)",
        "float32 parameters",
        "FP8 off",
        "activation checkpointing none; estimated peak n/a",
        "compile    off",
        "MFU against n/a (no known peak for cpu)",
        "procedural: 32 samples; global batch 4",
        "text bucket off",
    ):
        assert part in banner, (part, banner)
    assert "estimated peak 12.5 GiB per rank" in estimated
    # the procedural text is never cut without a bucket: the nominal step is the step the run executed
    executed = record["executed_tflops_per_step"]
    assert nominal_step_flops(trainer.config, 1) == pytest.approx(executed * 1e12, rel=1e-12)
    assert f"{executed:.4g} TFLOP per step" in banner
    assert record["mfu"] is None
