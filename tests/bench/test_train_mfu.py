"""bench/train_mfu.py: a variant that runs out of GPU memory is reported, and the other variants still run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import train_mfu
from selfe.train.trainer import Trainer


def test_a_variant_out_of_memory_is_reported_and_the_next_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    real_step = Trainer.train_step

    def step_without_checkpointing_runs_out(self):  # as a large batch without activation checkpointing can
        if self.config.parallel.activation_checkpointing == "none":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_without_checkpointing_runs_out)
    out = tmp_path / "mfu.json"
    argv = ["--preset", "tiny", "--resolution", "32", "--batch", "2", "--txt-tokens", "8", "--steps", "1"]
    assert train_mfu.main([*argv, "--warmup", "0", "--variants", "eager,ac", "--json", str(out)]) == 0
    eager, ac = json.loads(out.read_text())["results"]
    assert eager == {
        "variant": "eager",
        "fp8": "none",
        "rank": 0,
        "error": "out of memory at batch 2 per rank (CUDA out of memory. Tried to allocate 20.00 GiB)",
    }
    assert ac["variant"] == "ac" and ac["step_time_s"] > 0 and ac["loss_finite"]
    assert ac["tflops_per_step"] == ac["executed_tflops_per_step"] and ac["useful_share"] == 1.0  # no padding
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("eager ") and "out of memory at batch 2 per rank" in lines[0]
    assert lines[1].startswith("ac ") and "MFU" in lines[1]
