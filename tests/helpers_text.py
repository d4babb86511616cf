"""Test helpers for text encoders: tiny offline snapshots (built by selfe.components.text_snapshots) and a guard
that fails a test on any network access or unpickling.
"""

from __future__ import annotations

import contextlib
import pickle
import socket

import pytest
import torch

from selfe.components.text_snapshots import DEFAULT_WORDS, make_clip_snapshot, make_t5_snapshot

make_tiny_t5_snapshot = make_t5_snapshot
make_tiny_clip_snapshot = make_clip_snapshot
__all__ = [
    "DEFAULT_WORDS",
    "allow_inductor_unpickling",
    "forbid_network_and_unpickling",
    "make_tiny_clip_snapshot",
    "make_tiny_t5_snapshot",
]
PICKLE_LOAD, PICKLE_LOADS = pickle.load, pickle.loads  # before any test replaces them


def forbid_network_and_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """For an autouse fixture: opening a connection, torch.load or unpickling fails the test, and the
    hub libraries are told to stay offline. Loaders must read local safetensors files only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(what: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} attempted: {args[:1]}")

        return fail

    monkeypatch.setattr(socket.socket, "connect", refuse("network access"))
    monkeypatch.setattr(socket, "create_connection", refuse("network access"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("unpickling"))
    monkeypatch.setattr(pickle, "loads", refuse("unpickling"))


@contextlib.contextmanager
def allow_inductor_unpickling():
    """Inside forbid_network_and_unpickling: let pickle work again for a compile. Inductor's compile
    workers hand their Triton kernels back pickled (on CUDA), and its caches are pickles; none of that is a
    weight or checkpoint file of ours."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(pickle, "load", PICKLE_LOAD)
        monkeypatch.setattr(pickle, "loads", PICKLE_LOADS)
        yield
