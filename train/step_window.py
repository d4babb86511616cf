"""Step metrics without host syncs: each step's scalars stay on the device until a log step reads the whole
window at once (one `.tolist()`), and step times come from CUDA events (the host clock on a CPU, where the
work is synchronous and reading it costs nothing).

A step's device row holds, in this order: the objective's SCALARS (global means), the gradient norm, whether
the step was skipped, the skipped steps so far and the current non-finite streak. The counters are updated
on the device (`torch.where`), so a skipped step needs no host decision either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

COUNTERS = ("grad_norm", "skipped", "skipped_total", "streak")


class StepTimer:
    """Seconds of every step since the last `read()`: CUDA events around each step on a GPU (read at log
    steps, when the last one has completed), `time.perf_counter` on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: Any = None
        self._laps: list[tuple[Any, Any]] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._open = self._mark()

    def stop(self) -> None:
        self._laps.append((self._open, self._mark()))
        self._open = None

    def read(self) -> list[float]:
        laps, self._laps = self._laps, []
        if not self.cuda:
            return [end - begin for begin, end in laps]
        if laps:
            laps[-1][1].synchronize()  # complete after the log step's read; every earlier event too
        return [begin.elapsed_time(end) / 1e3 for begin, end in laps]


@dataclass
class PendingStep:
    step: int  # optimizer steps done after it (the metrics' step number)
    row: torch.Tensor  # (len(scalars) + len(COUNTERS) + len(device_names),) float64 on the device
    host: dict[str, Any]  # what the host knew without asking the device (lr, tau, flops, ...)
    device_names: tuple[str, ...] = ()  # further values the device computed (the useful FLOPs, ...)


class StepWindow:
    """The steps since the last log step, their device rows, and the device-side skip counters."""

    def __init__(self, device: torch.device, scalars: tuple[str, ...]):
        self.device, self.scalars = device, scalars
        self.timer = StepTimer(device)
        self.pending: list[PendingStep] = []
        self.skipped_total = torch.zeros((), dtype=torch.float64, device=device)
        self.streak = torch.zeros((), dtype=torch.float64, device=device)

    def set_counters(self, skipped_total: int, streak: int) -> None:
        """From a checkpoint (before the first step): a fill on the device, not a copy per step."""
        self.skipped_total.fill_(skipped_total)
        self.streak.fill_(streak)

    def add(
        self,
        step: int,
        means: torch.Tensor,
        grad_norm: torch.Tensor,
        finite: torch.Tensor,
        host: dict,
        device_values: dict[str, torch.Tensor | float] | None = None,
    ) -> None:
        skipped = (~finite).to(torch.float64)
        self.skipped_total = self.skipped_total + skipped
        self.streak = torch.where(finite, 0.0, self.streak + 1)
        counters = torch.stack([grad_norm.detach().to(torch.float64), skipped, self.skipped_total, self.streak])
        values = device_values or {}
        extra = [torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(1) for v in values.values()]
        row = torch.cat([means.to(torch.float64), counters, *extra])
        self.pending.append(PendingStep(step, row, host, tuple(values)))

    def read(self, extra: torch.Tensor) -> tuple[list[dict[str, Any]], float]:
        """Every pending step as {"step", scalar..., counter..., host value..., "step_time": s}, and the
        0-dim `extra` (a stop request), in one host read."""
        pending, self.pending = self.pending, []
        flat = torch.cat([*(p.row for p in pending), extra.reshape(1).to(torch.float64)]).tolist()
        times = self.timer.read()
        records, start = [], 0
        for p, seconds in zip(pending, times, strict=True):
            names = self.scalars + COUNTERS + p.device_names
            values = dict(zip(names, flat[start : start + len(names)], strict=True))
            records.append({"step": p.step, **values, **p.host, "step_time": seconds})
            start += len(names)
        return records, flat[-1]
