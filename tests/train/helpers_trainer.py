"""Small configs and helpers shared by the trainer tests (tiny model, 32^2 procedural latents)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from selfe.train.config import TrainConfig, apply_overrides, preset

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(run_dir: Path, steps: int, *extra: str) -> list[str]:
    """The tiny run's overrides; one in `extra` replaces the default of its key (the command line refuses a
    key given twice)."""
    replaced = {item.split("=", 1)[0].strip() for item in extra}
    defaults = [
        f"run_dir={run_dir}",
        f"steps={steps}",
        "data.batch_size=4",
        "data.resolution=32",
        "data.num_samples=32",
        "data.text_length=8",
        "optim.warmup_steps=2",
        "optim.decay_steps=40",
        "checkpoint.every=0",
        "checkpoint.keep=2",
        "metrics.tensorboard=false",
        "objective.tau_warmup=4",
        "checkpoint.export_stand_ins=false",  # the smoke preset's stand-in encoders import transformers (~8 s)
    ]
    return [item for item in defaults if item.split("=", 1)[0] not in replaced] + list(extra)


def tiny_config(run_dir: Path, steps: int, *extra: str) -> TrainConfig:
    return apply_overrides(preset("smoke"), tiny_overrides(run_dir, steps, *extra))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "selfe.train.cli", "smoke", *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "selfe.train.cli", "smoke", *overrides,
    ]  # fmt: skip


def run_train(overrides: list[str], nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(overrides, nproc), env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
