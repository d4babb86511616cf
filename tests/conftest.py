"""Shared test set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at collection,
whenever no CUDA device is present: Triton kernels then run on the CPU through the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

# Before any test module imports transformers: from the repo root, selfe steers the bare name `kernels` to the
# installed package rather than our kernels/ folder (selfe.utils.checkout).
import selfe  # noqa: F401
from tests.helpers_text import forbid_network_and_unpickling, make_tiny_clip_snapshot, make_tiny_t5_snapshot

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def no_network():
    """A module opts in with `pytestmark = pytest.mark.usefixtures("no_network")`: the whole module, its
    module-scoped fixtures included, runs with no network and no unpickling (forbid_network_and_unpickling)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        forbid_network_and_unpickling(monkeypatch)
        yield


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory):
    """A tiny T5 and a tiny CLIP snapshot, built once per module: (t5 folder, clip folder)."""
    root = tmp_path_factory.mktemp("text_snapshots")
    return make_tiny_t5_snapshot(root / "t5"), make_tiny_clip_snapshot(root / "clip")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or None (also None when not interpreting).

    Triton 3.6's interpreter turns a loop bound that is a kernel argument into int() of a one-element array,
    which numpy >= 2.4 refuses; a one-loop probe kernel tells, whatever the versions."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError as err:
        return f"triton is not importable ({err}); pip install -e '.[dev]'"

    @triton.jit
    def _count(out, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as err:  # the interpreter wraps what went wrong in its own error
        import numpy

        return (
            f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} ({err}); every test "
            "of a Triton kernel on CPU will fail. Fix: pip install 'numpy<2.4', or triton >= 3.7"
        )
    return None if out.item() == 3 else f"Triton's interpreter counted {out.item()} loop turns of 3"


INTERPRETER_PROBLEM = interpreter_problem()


def pytest_report_header(config: pytest.Config) -> str | None:
    return None if INTERPRETER_PROBLEM is None else f"WARNING: {INTERPRETER_PROBLEM}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if INTERPRETER_PROBLEM is not None:
        terminalreporter.write_line(f"WARNING: {INTERPRETER_PROBLEM}", red=True)
