"""Overlapped input: a batch source run a few optimizer steps ahead on a background thread.

The thread reads and decodes the next steps' micro-batches (cache reads, image decoding, online text
encoding), fits their text (`prepare`) and, on CUDA, copies them to the GPU from pinned memory with
non_blocking copies on a side stream; the training stream waits on an event, never the host. The batches,
and their order, are the source's own: the thread only runs it earlier. A checkpoint saves the source's
state after the last batch handed to the trainer (recorded by the thread after each step), not after the
ones read ahead, so a resume lands on the batch an uninterrupted run would have taken next.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Prepared:
    iteration: int
    batches: list[dict[str, Any]]
    state: dict[str, Any]  # the source's state after these batches
    ready: Any = None  # CUDA event recorded after the copies (None on a CPU)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    return value


def _each_tensor(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _each_tensor(v)
    elif isinstance(value, list):
        for v in value:
            yield from _each_tensor(v)


class Prefetcher:
    """`next_step(iteration)` -> this rank's micro-batches of optimizer step `iteration`, on `device`.

    source: a batch source (selfe.train.sources: `next_step(want_fake)`, `state_dict`, `load_state_dict`);
    want_fake_at: whether step `iteration` needs the fake prompt (the objective's `aux_on`);
    prepare: applied to each micro-batch on the thread, before the copy (the text-bucket cut);
    depth: steps read ahead (0: no thread, the source runs in the caller at each step);
    stop_at: the first iteration not to read (the run's end; nothing is encoded past it).
    Iterations must be asked for in order; the first call sets where the thread starts.
    """

    def __init__(
        self,
        source: Any,
        device: torch.device,
        want_fake_at: Callable[[int], bool],
        prepare: Callable[[dict[str, Any]], dict[str, Any]] = lambda batch: batch,
        depth: int = 2,
        stop_at: int | None = None,
    ):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.source, self.device, self.want_fake_at, self.prepare = source, device, want_fake_at, prepare
        self.depth, self.stop_at = depth, stop_at
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda and depth > 0 else None
        self._cond = threading.Condition()
        self._ready: deque[_Prepared | BaseException] = deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._next: int | None = None  # the iteration the next call must ask for
        self._state: dict[str, Any] | None = None  # the source's state after the last batches handed out

    # ------------------------------------------------------------------------------------------
    # The consumer (the training loop)

    def next_step(self, iteration: int) -> list[dict[str, Any]]:
        if self._next is not None and iteration != self._next:
            raise ValueError(f"the prefetcher reads steps in order: asked for {iteration}, next is {self._next}")
        past_end = self.stop_at is not None and iteration >= self.stop_at
        if past_end:
            self.close()  # the thread stopped before this step: read it here
        if self.depth == 0 or past_end:
            item = self._produce(iteration)
        else:
            if self._thread is None:
                self._start(iteration)
            item = self._take()
        self._next, self._state = iteration + 1, item.state
        if item.ready is not None:  # the training stream waits for the copies on the device, not the host
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(item.ready)
            for tensor in _each_tensor(item.batches):
                if tensor.device.type == "cuda":
                    tensor.record_stream(stream)  # allocated on the side stream, freed after use on this one
        return item.batches

    def _take(self) -> _Prepared:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._ready))
            item = self._ready.popleft()
            self._cond.notify_all()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state) if self._state is not None else self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.source.load_state_dict(state)
        self._state, self._next, self._closing = None, None, False

    def close(self) -> None:
        """Stop the thread and drop what it read ahead (the source itself stays usable)."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread.join()
        self._thread = None
        self._ready.clear()

    # ------------------------------------------------------------------------------------------
    # The producer (the background thread)

    def _start(self, iteration: int) -> None:
        self._closing = False
        self._thread = threading.Thread(target=self._run, args=(iteration,), name="selfe-prefetch", daemon=True)
        self._thread.start()

    def _run(self, iteration: int) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream:
            while self.stop_at is None or iteration < self.stop_at:
                try:
                    item: _Prepared | BaseException = self._produce(iteration)
                except BaseException as err:  # handed to the trainer, raised at its next step
                    item = err
                with self._cond:
                    self._cond.wait_for(lambda: self._closing or len(self._ready) < self.depth)
                    if self._closing:
                        return
                    self._ready.append(item)
                    self._cond.notify_all()
                if isinstance(item, BaseException):
                    return
                iteration += 1

    def _produce(self, iteration: int) -> _Prepared:
        batches = [self.prepare(batch) for batch in self.source.next_step(self.want_fake_at(iteration))]
        state = copy.deepcopy(self.source.state_dict())
        ready = None
        if self.cuda:
            batches = _map_tensors(batches, self._to_device)
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        else:
            batches = _map_tensors(batches, lambda t: t.to(self.device))
        return _Prepared(iteration, batches, state, ready)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            tensor = tensor.pin_memory()  # page-locked: the copy below runs asynchronously
        return tensor.to(self.device, non_blocking=True)
