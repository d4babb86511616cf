"""Per-step training metrics: model FLOPs of every pass, MFU, throughput, memory; JSONL, TensorBoard
(when installed), a progress line, and NVTX ranges (no-ops without CUDA).

FLOPs per micro-batch of B samples, B_self of them self-evaluated (docs/method.md §7), F(n) = one forward
of n samples from selfe.network.flops:
    3 F(B)              main forward + backward
    2 F(B_self)         the EMA-conditional and live-unconditional self-evaluation forwards (no grad)
    3 F(B_self)         with the auxiliary term on: the fake forward + backward (its forward, detached,
                        is also g_f: docs/method.md's separate no-grad fake forward is not run, so not counted)
Activation-checkpointing recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).
Each pass is counted twice (selfe.network.flops.forward_flops): useful FLOPs, every row at its real text
length from the batch's txt_mask (MFU and tflops_per_step), and executed FLOPs, every row at the padded
length run (executed_tflops_per_step). tokens/s counts the image tokens of the main pass (global batch x
image tokens per sample / step time); images/s the global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfe.method.schedule import self_eval_count
from selfe.network.config import MMDiTConfig
from selfe.network.flops import mmdit_forward_flops, useful_forward_flops
from selfe.utils import optional
from selfe.utils.atomic import atomic_write_bytes


def self_eval_samples(batch: int, split: str, self_eval: bool, frac_self: float | None = None) -> int:
    """Samples that get the extra no-grad passes: batch // 2 under the half split, else the measured count."""
    if not self_eval:
        return 0
    if split == "half":
        return self_eval_count(batch)
    return round((frac_self if frac_self is not None else 0.5) * batch)


def step_flops(
    config: MMDiTConfig,
    batch: int,
    img_tokens: int,
    txt_tokens: int,
    self_samples: int,
    aux_on: bool,
    text_masks: dict[str, Tensor | None] | None = None,
) -> dict[str, Any]:
    """Executed model FLOPs of one micro-batch by pass (see the module docstring) and their total, every
    row at `txt_tokens`; with `text_masks` (`text_masks_of(batch)`) also "useful": the same passes at each
    row's real text length, a float64 tensor on the masks' device (no host sync: read it when logging).

    Useful counts the main pass on the captions as given (a caption dropped for CFG is counted at its own
    length, not the null prompt's: the drop is drawn inside the loss), the self-evaluation passes on the
    first `self_samples` rows of the caption and null masks (exact under the half split, which takes those
    rows; an estimate under the Bernoulli one), and the fake pass on the fake captions' rows alike."""

    def fwd(n: int) -> int:
        return mmdit_forward_flops(config, n, img_tokens, txt_tokens) if n else 0

    parts: dict[str, Any] = {
        "main_fwd_bwd": 3 * fwd(batch),
        "self_eval_fwd": 2 * fwd(self_samples),
        "fake_fwd_bwd": 3 * fwd(self_samples) if aux_on else 0,
    }
    parts["total"] = sum(parts.values())
    if text_masks is not None:

        def useful(key: str, rows: int) -> Tensor | int:
            mask = text_masks.get(key)
            if not rows:
                return 0
            if mask is None:  # no mask: every token real
                return fwd(rows)
            return useful_forward_flops(config, img_tokens, mask[:rows]).double()  # rates in float64, not 32

        parts["useful"] = (
            3 * useful("cond", batch)
            + useful("cond", self_samples)
            + useful("null_cond", self_samples)
            + (3 * useful("fake_cond", self_samples) if aux_on else 0)
        )
    return parts


def text_masks_of(batch: dict[str, Any]) -> dict[str, Tensor | None]:
    """The (B, L) real-token masks of a training batch's conditions, by condition key (None where absent)."""
    return {k: (batch.get(k) or {}).get("txt_mask") for k in ("cond", "null_cond", "fake_cond")}


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool = True):
    """An NVTX range on CUDA (shows in Nsight Systems); nothing at all otherwise."""
    if enabled and torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak reserved/allocated GiB, allocation retries and OOMs since the last reset (CUDA only)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    gib = 1024**3
    return {
        "mem_max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
        "mem_max_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / gib,
        "mem_alloc_retries": stats.get("num_alloc_retries", 0),
        "mem_ooms": stats.get("num_ooms", 0),
    }


def format_mfu(mfu: float | None) -> str:
    """MFU as a percentage, or n/a where no peak is known."""
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Rank 0 writes one JSON object per step to `run_dir/metrics.jsonl` (flushed at once, so a watcher
    sees progress; a non-finite value is null), mirrors scalars to TensorBoard when it is installed, and
    prints a progress line."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        total_steps: int,
        log_every: int,
        peak_flops: float | None,
        world_size: int,
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.total_steps, self.log_every, self.world_size = total_steps, log_every, world_size
        self.peak_flops, self.enabled = peak_flops, enabled
        self._file = None
        self._tb = None
        self._last_print: tuple[int, float] | None = None  # (step, time) of the last progress line
        self._step_seconds = 0.0  # the step times logged since then
        if not enabled:
            return
        path = Path(run_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard:
            writer = optional.probe("tensorboard").module  # None where tensorboard is not installed
            if writer is not None:
                self._tb = writer.SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def throughput(self, step_time: float, images: int, tokens: int, flops: float) -> dict[str, float | None]:
        """Rates of one step over the whole job (images, tokens and flops summed over ranks); MFU None where
        no peak is known (a CPU without metrics.peak_flops)."""
        step_time = max(step_time, 1e-9)
        tflops_per_device = flops / step_time / self.world_size / 1e12
        return {
            "images_per_s": images / step_time,
            "tokens_per_s": tokens / step_time,
            "tflops_per_device": tflops_per_device,
            "mfu": tflops_per_device * 1e12 / self.peak_flops if self.peak_flops else None,
        }

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._last_print is None:
            self._last_print = (step - 1, now - record.get("step_time", 0.0))
        self._step_seconds += record.get("step_time", 0.0)
        record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
        self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
        if step % self.log_every == 0 or step == self.total_steps:
            # The rate over the steps since the last line: start-up and compilation fall out of it. The trainer
            # logs a window of steps at once (its log step's one sync), so the first window's rows arrive
            # microseconds apart: their own step times bound the elapsed time from below.
            elapsed = max(now - self._last_print[1], self._step_seconds)
            rate = (step - self._last_print[0]) / max(elapsed, 1e-9)
            self._last_print, self._step_seconds = (step, now), 0.0
            eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
            print(
                f"step {step}/{self.total_steps} | loss {record.get('loss', float('nan')):.4f} | "
                f"{rate:.2f} it/s | {record.get('images_per_s', 0):.1f} img/s | "
                f"{record.get('tflops_per_device', 0):.3g} TFLOP/s | MFU {format_mfu(record.get('mfu'))} | "
                f"lr {record.get('lr', 0):.2e} | ETA {format_eta(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def drop_after(self, step: int) -> None:
        """Keep only the records of steps <= `step` (a resume from that step's checkpoint runs the later
        ones again). A line cut short by a kill goes too. Rewritten to a temporary file, then renamed."""
        if not self.enabled:
            return
        path = Path(self._file.name)
        self._file.close()
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_bytes(path, "".join(kept).encode())
        self._file = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _json_value(value: Any) -> Any:
    """A non-finite number (a skipped step's loss) as null: NaN and Infinity are not JSON (jq refuses them)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
