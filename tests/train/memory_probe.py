"""Run under torchrun by test_memory_plan: a tiny trainer's second step on this rank, its live tensor bytes
measured with LiveBytes, beside the memory plan's estimate for this world size; rank 0 writes both as JSON."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from selfe.train.cli import end_rank
from selfe.train.config import apply_overrides, preset
from selfe.train.memory_plan import LiveBytes, plan_activation_checkpointing
from selfe.train.trainer import Trainer


def main(out: str, overrides: list[str]) -> None:
    config = apply_overrides(preset("smoke"), overrides)
    trainer = Trainer(config)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    plan = plan_activation_checkpointing(config, None, world, device_type="cpu")
    try:
        trainer.train_step()
        with LiveBytes() as tracker:
            tracker.track(p for m in (trainer.model, trainer.ema.model) for p in (*m.parameters(), *m.buffers()))
            tracker.track(v for state in trainer.optimizer.state.values() for v in state.values())
            tracker.reset_peak()
            trainer.train_step()
        trainer.log_metrics()  # the log step's sync: every collective of the steps done before the teardown
        peaks = [None] * world
        dist.all_gather_object(peaks, tracker.peak)
    finally:
        trainer.close()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"estimate": plan.est_peak_bytes, "peaks": peaks}, f)
    end_rank(trainer, 0)  # as selfe train ends a rank: gloo's threads may abort the process at Python's finalisation


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
