"""What the ShapesEval end-to-end tests share: a short `selfe train` of a shapes preset on a test data folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from selfe.shapes.data import MANIFEST
from tests.train.helpers_trainer import REPO, child_env


def train_shapes(preset: str, data: Path, run_dir: Path, steps: int, *overrides: str) -> Path:
    """`selfe train PRESET` (a subprocess, as a user runs it) for `steps` on `data`, at batch 8, with only
    the final checkpoint; returns the export folder."""
    argv = [
        f"run_dir={run_dir}",
        f"steps={steps}",
        "device=cpu",
        f"data.manifest={data / MANIFEST}",
        f"data.t5_path={data / 'text_encoder'}",
        f"data.clip_path={data / 'text_encoder_2'}",
        "data.batch_size=8",
        "checkpoint.every=0",
        "metrics.tensorboard=false",
        *overrides,
    ]
    command = [sys.executable, "-m", "selfe.train.cli", preset, *argv]
    result = subprocess.run(command, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "export"
