"""Deterministic, resumable, sharded batch order over aspect-ratio buckets.

The order is a pure function of (seed, epoch, position):
1. permute all samples with an RNG keyed on (seed, epoch);
2. split each aspect class, in that permuted order, into global batches of batch_size * world_size;
3. permute the global batches with the same RNG.
Every global batch holds one aspect class; rank r takes slice [r * batch_size, (r + 1) * batch_size),
so ranks are disjoint, together cover the batch, and all see the same number of batches per epoch
and the same bucket at the same step (balanced work). The base resolution of each batch comes from
the ResolutionSchedule at the global iteration `step // batches_per_step`, identical on every rank.

A class's remainder (fewer samples than a global batch) is
- "drop": left out this epoch. The permutation changes every epoch, so a different remainder is
  dropped each time; a class smaller than one global batch is never used (a warning says so).
- "pad": filled up with samples of the same class from the start of its permuted list (wrapping), so
  every sample appears at least once per epoch and a few appear twice.

Stages: a run may resume with another batch size (the paper lowers the global batch from 1024 to 768
at 500k iterations). The partly read epoch is then left, and the new stage starts at the next epoch's
first batch of the new size; `step` and the iteration the resolution schedule reads keep counting from
where the old stage stopped. Another `batches_per_step` (optim.grad_accum) leaves the batches as they
are: the new stage starts at the next batch and only groups them into iterations anew, from the saved
iteration on. The sampler takes another world size like another batch size, but `selfe train` refuses
it (its checkpoints hold per-rank RNG streams). A changed data set, remainder policy or shuffle is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from selfe.train.data.buckets import ResolutionSchedule

log = logging.getLogger(__name__)

REMAINDER_POLICIES = ("drop", "pad")


@dataclass(frozen=True)
class BatchPlan:
    """One batch for this rank. step: batches since epoch 0 position 0; resolution: base resolution
    from the schedule (None without one); indices: this rank's sample indices (batch_size of them)."""

    step: int
    epoch: int
    position: int
    aspect_class: int
    resolution: int | None
    indices: tuple[int, ...]


class BucketBatchSampler:
    """Batches of sample indices, each from one aspect class; see the module docstring.

    aspect_classes: (N,) the aspect class of every sample.
    The sampler is an iterator (infinite, across epochs); `state_dict()` is the position of the next
    batch, so save -> rebuild -> `load_state_dict` -> next() continues exactly where it stopped.
    """

    def __init__(
        self,
        aspect_classes: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        remainder: str = "drop",
        shuffle: bool = True,
        schedule: ResolutionSchedule | None = None,
        batches_per_step: int = 1,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("world_size", world_size),
            ("batches_per_step", batches_per_step),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        self.classes = np.asarray(aspect_classes, dtype=np.int64)
        if self.classes.ndim != 1 or len(self.classes) == 0:
            raise ValueError(f"aspect_classes must be a non-empty 1-D sequence, got shape {self.classes.shape}")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.remainder = remainder
        self.shuffle = shuffle
        self.schedule = schedule
        self.batches_per_step = batches_per_step
        self.epoch = 0
        self.position = 0
        # Where this stage began: its first (epoch, position), and the batches / iterations drawn before it.
        self._epoch_base, self._position_base, self._step_base, self._iteration_base = 0, 0, 0, 0
        self._cached: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        self._class_ids, self._class_counts = np.unique(self.classes, return_counts=True)
        g = self.global_batch_size
        if remainder == "drop":
            self._batches_per_epoch = int(sum(n // g for n in self._class_counts))
        else:
            self._batches_per_epoch = int(sum(-(-n // g) for n in self._class_counts))
        self._check_sizes()

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_samples(self) -> int:
        return len(self.classes)

    def _check_sizes(self) -> None:
        ids, counts = self._class_ids, self._class_counts
        if self.remainder == "drop":
            small = {int(c): int(n) for c, n in zip(ids, counts) if n < self.global_batch_size}
            if small:
                log.warning(
                    "aspect classes %s have fewer samples than one global batch (%d) and are never used "
                    "with remainder='drop'",
                    small,
                    self.global_batch_size,
                )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no full global batch of {self.global_batch_size} (batch_size {self.batch_size} x "
                f"world_size {self.world_size}) fits in any aspect class "
                f"(class sizes {dict(zip(ids.tolist(), counts.tolist()))}); "
                "lower the per-rank batch size (data.batch_size) or the number of ranks, or add samples"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch, the same on every rank; independent of the epoch."""
        return self._batches_per_epoch

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(aspect class, global batch indices (batch_size * world_size,))] of one epoch, in order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = self.num_samples
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        ordered_classes = self.classes[order]
        g = self.global_batch_size
        batches: list[tuple[int, np.ndarray]] = []
        for c in self._class_ids:
            members = order[ordered_classes == c]
            full = len(members) // g
            for b in range(full):
                batches.append((int(c), members[b * g : (b + 1) * g]))
            left = len(members) - full * g
            if left and self.remainder == "pad":
                fill = np.resize(members, g - left)  # wraps around a class smaller than the fill
                batches.append((int(c), np.concatenate([members[full * g :], fill])))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    def plan(self, epoch: int, position: int) -> BatchPlan:
        """This rank's batch at (epoch, position): a pure function of the seed and the config."""
        batches = self.epoch_plan(epoch)
        if not 0 <= position < len(batches):
            raise IndexError(f"position {position} outside epoch of {len(batches)} batches")
        aspect_class, members = batches[position]
        step, iteration = self._counters(epoch, position)
        resolution = None
        if self.schedule is not None:
            resolution = self.schedule.resolution_at(iteration, self.seed)
        mine = members[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return BatchPlan(step, epoch, position, aspect_class, resolution, tuple(int(i) for i in mine))

    def _counters(self, epoch: int, position: int) -> tuple[int, int]:
        """(batches drawn before the batch at (epoch, position), optimizer iterations before it)."""
        local = (epoch - self._epoch_base) * self.batches_per_epoch + position - self._position_base
        return self._step_base + local, self._iteration_base + local // self.batches_per_step

    def advance(self, epoch: int, position: int) -> tuple[int, int]:
        """The (epoch, position) after the batch at (epoch, position)."""
        position += 1
        if position >= self.batches_per_epoch:
            return epoch + 1, 0
        return epoch, position

    def iter_epoch(self, epoch: int) -> Iterator[BatchPlan]:
        """The batches of one epoch (does not touch the iterator state)."""
        for position in range(self.batches_per_epoch):
            yield self.plan(epoch, position)

    def __iter__(self) -> BucketBatchSampler:
        return self

    def __next__(self) -> BatchPlan:
        plan = self.plan(self.epoch, self.position)
        self.epoch, self.position = self.advance(self.epoch, self.position)
        return plan

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from, and what must match to resume exactly."""
        step, iteration = self._counters(self.epoch, self.position)
        return {
            "epoch": self.epoch,
            "position": self.position,
            "step": step,
            "iteration": iteration,
            "stage": [self._epoch_base, self._step_base, self._iteration_base, self._position_base],
            "batches_per_step": self.batches_per_step,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "remainder": self.remainder,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. The seed comes from the state. A changed batch size, world size
        or batches_per_step starts a new stage (module docstring; a state that does not record
        batches_per_step is taken to have this one); a changed dataset size, remainder policy or shuffle
        would change what an epoch is, so it is an error."""
        for key in ("num_samples", "remainder", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: saved {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}"
                )
        self.seed = int(state["seed"])
        self._cached = None
        epoch, position = int(state["epoch"]), int(state["position"])
        if (state["batch_size"], state["world_size"]) != (self.batch_size, self.world_size):
            self._new_stage(state, epoch, position)
            return
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"saved position (epoch {epoch}, position {position}) is out of range")
        saved_per_step = int(state.get("batches_per_step", self.batches_per_step))
        if saved_per_step != self.batches_per_step:
            self._regroup(state, epoch, position, saved_per_step)
            return
        stage = [int(v) for v in state.get("stage", (0, 0, 0))]
        self._epoch_base, self._step_base, self._iteration_base = stage[:3]
        self._position_base = stage[3] if len(stage) > 3 else 0  # states from before mid-epoch stages
        self.epoch, self.position = epoch, position

    def _new_stage(self, state: dict[str, Any], epoch: int, position: int) -> None:
        if "iteration" not in state:
            raise ValueError("cannot change the batch size on resume: the saved data order predates stages")
        start = epoch + (1 if position else 0)  # the partly read epoch is left
        self._epoch_base, self._position_base = start, 0
        self._step_base, self._iteration_base = int(state["step"]), int(state["iteration"])
        self.epoch, self.position = start, 0
        log.warning(
            "data order: global batch %d x %d -> %d x %d from iteration %d; the new stage starts at epoch %d",
            state["batch_size"],
            state["world_size"],
            self.batch_size,
            self.world_size,
            self._iteration_base,
            start,
        )

    def _regroup(self, state: dict[str, Any], epoch: int, position: int, saved_per_step: int) -> None:
        """Another batches_per_step, same batches: a stage from the next batch on, so the iterations (and the
        resolutions drawn for them) continue from the saved one instead of being recounted from the stage's
        start with the new grouping."""
        self._epoch_base, self._position_base = epoch, position
        self._step_base, self._iteration_base = int(state["step"]), int(state["iteration"])
        self.epoch, self.position = epoch, position
        log.warning(
            "data order: %d -> %d batches per iteration from iteration %d",
            saved_per_step,
            self.batches_per_step,
            self._iteration_base,
        )
