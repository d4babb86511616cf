"""The trainer across processes (torchrun on 127.0.0.1, gloo, FSDP2) and under real signals."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from selfe.train.checkpoint import Checkpointer
from selfe.train.export import export_checkpoint
from tests.train.helpers_trainer import REPO, child_env, read_metrics, run_train, tiny_overrides, train_command

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # several gloo processes, tens of seconds each


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    """2 ranks x micro-batch 4 == 1 rank x 2 micro-batches of 4: same samples, same noise per slot."""
    one = run_train(tiny_overrides(tmp_path / "one", 4, "optim.grad_accum=2"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(tiny_overrides(tmp_path / "two", 4), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 4
    for key in ("loss", "grad_norm", "lambda_mean"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]), rtol=1e-5, atol=1e-6
        )
    wa = load_file(tmp_path / "one" / "export" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "export" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:  # the EMA weights
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
    # the live weights in the final DCP checkpoints (2 shards vs 1), read back without a process group
    live = {}
    for name in ("one", "two"):
        out = tmp_path / f"{name}.pt"
        dcp_to_torch_save(tmp_path / name / "checkpoints" / f"step_{4:09d}", out)
        live[name] = torch.load(out, weights_only=True)["model"]
    assert live["one"].keys() == live["two"].keys() and len(live["one"]) == len(wa)
    for key in live["one"]:
        torch.testing.assert_close(live["two"][key], live["one"][key], rtol=1e-5, atol=1e-6)
    # `selfe export` of the 2-rank checkpoint, in one process, writes the EMA weights the run exported
    exported = load_file(export_checkpoint(tmp_path / "two", tmp_path / "two-exported") / "model.safetensors")
    for key in wb:
        torch.testing.assert_close(exported[key], wb[key], rtol=0, atol=0)


def _wait_for_steps(proc: subprocess.Popen, run_dir, steps: int, timeout: float = 90) -> None:
    """Poll the metrics file (not a sleep as synchronisation: we wait for the child's own report)."""
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir)) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the trainer did not report steps in time")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_exits_zero(tmp_path, signum):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(
        train_command(tiny_overrides(run_dir, 10_000)), env=child_env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_steps(proc, run_dir, 2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    steps_done = len(read_metrics(run_dir))
    latest = Checkpointer(run_dir / "checkpoints", keep=2).latest()
    assert latest is not None and latest.name == f"step_{steps_done:09d}"
    assert "stopped by signal" in out


def test_killed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    run_dir = tmp_path / "kill"
    # checkpoints at steps 2 and 4; a SIGKILL inside the write of step 4 (data written, not yet renamed)
    killed = run_train(tiny_overrides(run_dir, 6, "checkpoint.every=2", "fault.kill_in_checkpoint_step=4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / f"step_{4:09d}.tmp").is_dir()  # the interrupted write
    assert Checkpointer(ckpts, keep=2).latest() == ckpts / f"step_{2:09d}"
    # resuming loads step 2 and trains on to the end, equal to a run that was never killed
    resumed = run_train(tiny_overrides(run_dir, 6, "checkpoint.every=2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    clean = run_train(tiny_overrides(tmp_path / "clean", 6, "checkpoint.every=2"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    after = [r["loss"] for r in read_metrics(run_dir)][-4:]  # steps 3..6 of the resumed run
    expected = [r["loss"] for r in read_metrics(tmp_path / "clean")][2:]
    torch.testing.assert_close(torch.tensor(after), torch.tensor(expected), rtol=0, atol=1e-6)
    assert not list(ckpts.glob("*.tmp"))  # cleaned up on restart
