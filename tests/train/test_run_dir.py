"""A run folder owns itself: a folder that is not a run is refused untouched, a second trainer on a live run is
refused naming the first (which finishes unharmed), and a kill -9 leaves no stale lock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from selfe.train.checkpoint import Checkpointer
from selfe.train.cli import train_main
from selfe.train.config import load_config
from selfe.train.run_dir import LOCK, MARKER, RunDirError, claim_run_dir
from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import (
    REPO,
    child_env,
    read_metrics,
    run_train,
    tiny_config,
    tiny_overrides,
    train_command,
)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (folders too) and each file's SHA-256: equal snapshots, an untouched folder."""
    out = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return out


def not_a_run(root: Path) -> Path:
    """A folder of someone's files, among them names a run would clean (export*/, *.tmp) or write into."""
    root.mkdir()
    (root / "config.json").write_text('{"mine": true}')
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "notes.txt").write_text("keep me")
    for sub in ("export", "export.old", "checkpoints/step_000000001.tmp"):
        (root / sub).mkdir(parents=True)
        (root / sub / "data.bin").write_bytes(os.urandom(64))
    return root


def wait_until_locked_by(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll the lock file until `proc` has written itself in as the holder (it holds the flock by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if json.loads((run_dir / LOCK).read_text())["pid"] == proc.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)  # polling interval only: the condition above is what synchronises
    raise AssertionError(f"{proc.pid} did not take the lock of {run_dir} within {timeout} s")


def test_a_folder_that_is_not_a_run_is_refused_and_left_byte_identical(tmp_path: Path, capsys) -> None:
    root = not_a_run(tmp_path / "mine")
    before = snapshot(root)
    assert train_main(["smoke", *tiny_overrides(root, 2)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and not a selfe run" in err
    assert "checkpoints/, config.json, export/, export.old/ and 2 more" in err
    assert snapshot(root) == before


def test_a_new_or_empty_folder_becomes_a_run_and_a_marked_one_resumes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_run_dir(empty, "smoke").release()
    marker = json.loads((empty / MARKER).read_text())
    assert marker["format"] == "selfe-run" and marker["config"] == "smoke"
    claim_run_dir(empty, "other").release()  # its own run again: the marker stays the first one
    assert json.loads((empty / MARKER).read_text()) == marker
    legacy = not_a_run(tmp_path / "legacy")
    (legacy / MARKER).touch()  # adopting a folder: an empty marker does
    claim_run_dir(legacy, "smoke").release()
    claim_run_dir(tmp_path / "new" / "run", "smoke").release()
    assert (tmp_path / "new" / "run" / MARKER).is_file()


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """flock conflicts between two opens of the file in one process too, so this needs no second process."""
    lock = claim_run_dir(tmp_path / "run", "smoke")
    with pytest.raises(RunDirError, match=rf"in use by another trainer \(pid {os.getpid()} on host "):
        claim_run_dir(tmp_path / "run", "smoke")
    assert socket.gethostname() in json.loads((tmp_path / "run" / LOCK).read_text())["host"]
    with pytest.raises(RunDirError, match="in use by another trainer"):
        Trainer(tiny_config(tmp_path / "run", 1))
    lock.release()
    lock.release()  # idempotent
    claim_run_dir(tmp_path / "run", "smoke").release()


@pytest.mark.slow
@pytest.mark.dist
def test_a_second_trainer_is_refused_and_the_first_finishes_unharmed(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(tiny_overrides(run_dir, 10_000)), env=child_env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until_locked_by(run_dir, first)
        assert train_main(["smoke", *tiny_overrides(run_dir, 4)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another trainer (pid {first.pid} on host {socket.gethostname()}" in err, err
        while len(read_metrics(run_dir)) < 2:  # the first one trains on
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # it checkpoints and ends cleanly
        _, first_err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, first_err
    steps = [r["step"] for r in read_metrics(run_dir)]
    latest = Checkpointer(run_dir / "checkpoints", keep=2).latest()
    assert latest is not None and steps == list(range(1, int(latest.name.split("_")[1]) + 1))
    assert load_config(run_dir / "config.json") == tiny_config(run_dir, 10_000)


@pytest.mark.slow
@pytest.mark.dist
def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        train_command(tiny_overrides(run_dir, 10_000)), env=child_env(), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_locked_by(run_dir, holder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    trainer = Trainer(tiny_config(run_dir, 2))
    try:
        assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
        assert trainer.train().step == 2
    finally:
        trainer.close()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # none of the killed run's lines stay


@pytest.mark.slow
@pytest.mark.dist
def test_every_rank_stops_when_rank_0_refuses(tmp_path: Path) -> None:
    root = not_a_run(tmp_path / "mine")
    before = snapshot(root)
    result = run_train(tiny_overrides(root, 2), nproc=2)
    assert result.returncode != 0
    assert "is not empty and not a selfe run" in result.stderr and "rank 0 refused run_dir" in result.stderr
    assert snapshot(root) == before
