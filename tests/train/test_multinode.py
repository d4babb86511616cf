"""Multi-node as users launch it: two "nodes" of two ranks each on 127.0.0.1, joined through torchrun's
c10d rendezvous (each node's agent started on its own, no ranks given: the rendezvous assigns them), train
exactly what one process does with the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train.helpers_trainer import REPO, child_env, free_port, read_metrics, run_train, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 3


def node_command(port: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=selfe-multinode",
        "--max-restarts=0", "-m", "selfe.train.cli", "smoke", *overrides,
    ]  # fmt: skip


def test_two_nodes_of_two_ranks_equal_one_process(tmp_path) -> None:
    """4 ranks x micro-batch 2 == 1 rank x 4 micro-batches of 2: same samples, same noise per slot."""
    one = run_train(tiny_overrides(tmp_path / "one", STEPS, "data.batch_size=2", "optim.grad_accum=4"))
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    overrides = tiny_overrides(tmp_path / "nodes", STEPS, "data.batch_size=2")
    nodes = [
        subprocess.Popen(node_command(port, overrides), env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for _ in range(2)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300))
    finally:
        for node in nodes:  # a node left waiting for its peer at the rendezvous must not outlive the test
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    # equal losses mean one world of 4 ranks: two worlds of 2 would each average 4 samples, not 8
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "nodes")
    assert len(a) == len(b) == STEPS
    for key in ("loss", "grad_norm", "lambda_mean"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]), rtol=1e-5, atol=1e-6
        )
