"""Checkpoints on torch.distributed.checkpoint (DCP), written atomically and kept to the last K.

Layout of `run_dir/checkpoints`:
    step_000001000/          a complete checkpoint (the rename is the commit)
        .metadata, __*.distcp    DCP: model, EMA, optimizer, LR scheduler, step, counters (sharded tensors)
        rank00000.pt             per rank: RNG states and the data-loader position
        config.json              the resolved training config
        meta.json                step, world size (written last, before the rename)
    step_000002000.tmp/      a write in progress, or one a kill interrupted: never read, removed on start

A kill at any moment leaves every earlier complete checkpoint intact, since nothing is written into a
final directory: all writes go to the .tmp directory, renamed (atomically on POSIX) when every rank is
done.

Loading runs nothing a checkpoint holds: DCP's files are read through selfe.train.checkpoint_reader (an
allow-list unpickler for `.metadata`, weights_only for everything else), the rank files with
torch.load(weights_only=True), the rest is JSON. A file that cannot be read is named; `load_newest` then
logs it and resumes from the checkpoint before it (or refuses, with fall_back=False).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from selfe.train.checkpoint_reader import (
    METADATA_NAME,
    DamagedCheckpointError,
    first_failure,
    load_dcp,
    read_json_file,
    read_metadata_file,
    read_rank_file,
)

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{9})$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, Python, NumPy), as tensors and plain Python values only,
    so the file loads with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and finds checkpoints under `root`; every rank calls `save` / `load` (they are collective)."""

    def __init__(self, root: str | os.PathLike, keep: int, rank: int = 0, world_size: int = 1):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / "meta.json").is_file() and (path / ".metadata").is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def clean_partial(self) -> None:
        """Remove the .tmp directories of interrupted writes (rank 0; call before any save)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob("step_*.tmp"):
                shutil.rmtree(path, ignore_errors=True)
        _barrier()

    def save(
        self,
        step: int,
        state: dict[str, Any],
        rank_state: dict[str, Any],
        config: dict[str, Any],
        before_commit=None,
    ) -> Path:
        """Write checkpoint `step`. state: DCP state dict (same keys on every rank); rank_state: this
        rank's plain objects. `before_commit` (tests) runs after the data is written, before the rename."""
        final = self.root / f"step_{step:09d}"
        tmp = self.root / f"step_{step:09d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rank_state, tmp / f"rank{self.rank:05d}.pt")
        _barrier()
        if before_commit is not None:
            before_commit()
        if self.rank == 0:
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
            with open(tmp / "meta.json", "w") as f:
                json.dump({"step": step, "world_size": self.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # the same step saved again (e.g. a signal right at a checkpoint step)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
        """Load `path` into `state` in place (DCP); returns this rank's plain objects. A file that cannot be
        read is a DamagedCheckpointError naming it, on every rank alike; a checkpoint of another world size,
        or one that does not fit `state`, a ValueError."""
        path = Path(path)
        problem = None
        try:  # every small file first, so that no rank enters the collective DCP load alone
            meta = read_json_file(path / "meta.json")
            if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "world_size")):
                raise DamagedCheckpointError(path / "meta.json", f"no integer step and world_size in {meta!r}")
            if (path / "config.json").is_file():  # older checkpoints have none
                read_json_file(path / "config.json")
            read_metadata_file(path / METADATA_NAME)
            rank_state = read_rank_file(path / f"rank{self.rank:05d}.pt")
        except DamagedCheckpointError as err:
            problem = err
        if (problem := _any_rank(problem)) is not None:
            raise problem
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.world_size}; "
                "the data order and RNG streams are per rank, so resume needs the same world size"
            )
        try:
            load_dcp(path, state)
        except CheckpointException as err:  # collective: every rank gets it
            raise ValueError(f"checkpoint {path} does not fit this run: {first_failure(err)}") from None
        return rank_state

    def load_newest(
        self, make_state: Callable[[], dict[str, Any]], fall_back: bool = True
    ) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """(path, state, rank_state) of the newest complete checkpoint that reads, loaded into a fresh
        `make_state()`; None when there is none. A damaged one is logged by file name and the one before it
        tried; with fall_back=False it is an error instead. None of them readable is an error too."""
        damaged: list[str] = []
        for _, path in reversed(self.complete()):
            state = make_state()
            try:
                return path, state, self.load(path, state)
            except DamagedCheckpointError as err:
                if not fall_back:
                    raise ValueError(
                        f"cannot resume from {path}: {err}; checkpoint.fall_back=true would resume from the "
                        "checkpoint before it"
                    ) from None
                if self.rank == 0:
                    log.warning("checkpoint %s not used: %s; trying the one before it", path.name, err)
                damaged.append(str(err))
        if damaged:
            raise ValueError(
                f"no checkpoint in {self.root} can be read: {'; '.join(damaged)}; delete the damaged ones to start "
                "the run over, or restore them"
            )
        return None


def _any_rank(error: DamagedCheckpointError | None) -> DamagedCheckpointError | None:
    """The first rank's error, on every rank (None if no rank has one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    errors: list[DamagedCheckpointError | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)
