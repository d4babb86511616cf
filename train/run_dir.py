"""A run folder that owns itself: a marker that says "a selfe run lives here", and a lock held while one writes.

    run_dir/.selfe-run       {"format": "selfe-run", "version": 1, "created": ..., "config": name}, written when
                             a run starts in a new or empty folder. A non-empty folder without it is not a run:
                             the trainer would replace its config.json, append to its metrics.jsonl and delete
                             its export*/ and checkpoints/*.tmp folders, so it is refused and left untouched.
                             (A run from before markers is adopted by creating the file; an empty one does.)
    run_dir/.selfe-run.lock  flock(LOCK_EX) by rank 0 for the whole run; it holds {"pid", "host", "since"} so a
                             second trainer is refused naming the first. The kernel drops an flock when its
                             process dies, kill -9 included: a file left behind is never a stale lock.

With several ranks, rank 0 alone claims the folder, before any rank writes there, and tells the others whether
it may (`claim_on_rank0`): a refusal stops every rank with an error, none waits or writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

from selfe.utils.atomic import atomic_write_json

MARKER = ".selfe-run"
LOCK = ".selfe-run.lock"
MARKER_FORMAT = {"format": "selfe-run", "version": 1}
SHOWN_ENTRIES = 4  # how many of a refused folder's entries its error names


class RunDirError(ValueError):
    """The run folder cannot be this run's: not a run, or in use by another trainer."""


class RunDirLock:
    """The claim on a run folder: its lock file, open and flock'ed. `release()` ends it (idempotent)."""

    def __init__(self, run_dir: Path, file: IO[str]):
        self.run_dir, self._file = run_dir, file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor drops the flock; the file stays (see the docstring)
            self._file = None


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of `run_dir` that make it not a run: all of them, if it exists, is non-empty and has no
    marker (our own lock file and marker temp files aside: a kill can leave them before the marker)."""
    if not run_dir.is_dir() or (run_dir / MARKER).exists():
        return []
    ours = (f"{MARKER}.", f".{MARKER}.")  # the lock file, the marker's atomic-write temp files
    entries = sorted(p for p in run_dir.iterdir() if not p.name.startswith(ours))
    return [p.name + ("/" if p.is_dir() else "") for p in entries]


def _not_a_run(run_dir: Path, entries: list[str]) -> RunDirError:
    more = len(entries) - SHOWN_ENTRIES
    shown = ", ".join(entries[:SHOWN_ENTRIES]) + (f" and {more} more" if more > 0 else "")
    return RunDirError(
        f"run_dir {str(run_dir)!r} is not empty and not a selfe run (no {MARKER} marker): it holds {shown}. "
        "A run writes config.json, metrics.jsonl, checkpoints/ and export/ there and deletes leftover export*/ "
        "and *.tmp folders, so it starts only in a new or empty folder or in its own earlier run; pass another "
        f"run_dir (a run from before run markers is adopted by creating {run_dir / MARKER})"
    )


def _holder(file: IO[str]) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    file.seek(0)
    try:
        info = json.loads(file.read())
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):  # it has the lock but has not written itself in yet
        return "a process that is starting up"


def claim_run_dir(run_dir: str | os.PathLike, config_name: str) -> RunDirLock:
    """Make `run_dir` this process's run: refuse a folder that is not a run (writing nothing), take the lock
    (refusing, with the holder's pid and host, if another trainer has it), write the marker if new."""
    run_dir = Path(run_dir)
    if entries := foreign_entries(run_dir):  # before anything is created there
        raise _not_a_run(run_dir, entries)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK
    created = not lock_path.exists()
    file = open(lock_path, "a+", encoding="utf-8")  # "a+": no truncation, the holder's details stay readable
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(file)
        file.close()
        raise RunDirError(
            f"run_dir {str(run_dir)!r} is in use by another trainer ({holder}); two runs in one folder would "
            "delete each other's checkpoints and mix their metrics: wait for it to end, or pass another run_dir"
        ) from None
    try:
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}) + "\n")
        file.flush()
        if entries := foreign_entries(run_dir):  # filled by someone else between the first look and the lock
            raise _not_a_run(run_dir, entries)
        if not (run_dir / MARKER).exists():
            atomic_write_json(run_dir / MARKER, {**MARKER_FORMAT, "created": _now(), "config": config_name})
    except BaseException:
        if created:
            lock_path.unlink(missing_ok=True)
        file.close()
        raise
    return RunDirLock(run_dir, file)


def claim_on_rank0(
    run_dir: str | os.PathLike, config_name: str, rank: int, world_size: int, device: torch.device
) -> RunDirLock | None:
    """Rank 0 claims the folder (`claim_run_dir`) and every rank learns the outcome in one broadcast, so a
    refusal raises on every rank before any of them writes; a success returns the lock on rank 0, None elsewhere.
    Collective: every rank of the process group calls it."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = claim_run_dir(run_dir, config_name)
        except Exception as err:  # any failure (an OSError too) must reach the broadcast, or the others hang
            error = err
    if world_size > 1:
        refused = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.broadcast(refused, src=0)
        if rank != 0 and refused.item():
            raise RunDirError(f"rank 0 refused run_dir {str(run_dir)!r} (its error says why); this rank stops too")
    if error is not None:
        raise error
    return lock


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
