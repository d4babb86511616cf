"""Shared test set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at collection,
whenever no CUDA device is present: Triton kernels then run on the CPU through the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

# Before any test module imports transformers: from the repo root, selfe steers the bare name `kernels` to the
# installed package rather than our kernels/ folder (selfe.checkout).
import selfe  # noqa: F401

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
