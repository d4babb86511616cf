"""Seconds per stage of one sampling call, timed without a host sync on the way.

On CUDA each stage's edges are CUDA events recorded on the current stream: the call queues its work
as it would untimed, and a stage's time is what the device timeline shows between its edges (host
work such as tokenising included, where the device waits for it). The times are read, waiting for the
stage's last event, only when someone reads them. On a CPU the edges are `time.perf_counter()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


class StageTimings(Mapping[str, float]):
    """{stage: seconds}, a stage timed with `with timings("denoise"):` or `start(name)` / `stop(name)`;
    a stage timed twice adds up. Only finished stages are keys."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._open: dict[str, Any] = {}
        self._spans: dict[str, list[tuple[Any, Any]]] = {}

    def _mark(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"stage {name!r} is already being timed")
        self._open[name] = self._mark()

    def stop(self, name: str) -> None:
        if name not in self._open:
            raise RuntimeError(f"stage {name!r} was not started")
        self._spans.setdefault(name, []).append((self._open.pop(name), self._mark()))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        yield
        self.stop(name)

    def __getitem__(self, name: str) -> float:
        return sum(_seconds(start, end) for start, end in self._spans[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._spans))

    def __len__(self) -> int:
        return len(self._spans)

    def __repr__(self) -> str:
        return f"StageTimings({dict(self)!r})"


def _seconds(start: Any, end: Any) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()  # the stage's work done: its time is known
    return start.elapsed_time(end) / 1e3
