"""What a pipeline call shows and lets a caller do between denoising steps, in diffusers' conventions:

    pipe.set_progress_bar_config(disable=True)            # no bar (or desc=..., leave=False, file=...)
    pipe(prompt, callback_on_step_end=fn, callback_on_step_end_tensor_inputs=["latents"])

One tqdm bar per call over its denoising steps, on by default. Both the bar and the callback run in the
host loop between steps, never inside the compiled or graph-captured step, and add no host sync of their
own: the bar counts steps as the host issues them (on CUDA it can run ahead of the device), and a callback
that reads a tensor's values syncs because it asked to.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from tqdm import std as tqdm_std
from tqdm.auto import tqdm  # a widget in notebooks, text elsewhere (as diffusers)

# The tensors a callback may ask for (callback_on_step_end_tensor_inputs) and return replaced.
CALLBACK_TENSOR_INPUTS = ("latents",)
# tqdm keywords the pipeline sets itself (the step count) or that would open a window.
_BAR_KEYWORDS_TAKEN = ("iterable", "total", "gui")


def _tqdm_keywords() -> frozenset[str]:
    names = inspect.signature(tqdm_std.tqdm.__init__).parameters  # tqdm.auto's classes take **kwargs
    return frozenset(n for n in names if n not in ("self", "kwargs", *_BAR_KEYWORDS_TAKEN))


class ProgressBarMixin:
    """diffusers' `set_progress_bar_config` / `progress_bar` for a pipeline class."""

    _progress_bar_config: dict[str, Any] = {}  # replaced by set_progress_bar_config, never changed in place

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm keywords for the bar of every later call, replacing earlier ones (as in diffusers):
        `disable=True` turns it off, `desc=`, `leave=`, `file=`, `position=` ... style it. An unknown keyword
        is a TypeError naming it; `total` is the call's step count and cannot be set."""
        unknown = sorted(set(kwargs) - _tqdm_keywords())
        if unknown:
            raise TypeError(
                f"set_progress_bar_config got keywords tqdm does not take here: {unknown} "
                f"(known: {sorted(_tqdm_keywords())})"
            )
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, total: int) -> tqdm:
        """A bar over `total` steps with the configured keywords (unit "step" unless configured)."""
        return tqdm(total=total, **{"unit": "step", **self._progress_bar_config})


def check_step_callback(callback: Any, tensor_inputs: Any) -> list[str]:
    """`callback_on_step_end` (None or a callable) and `callback_on_step_end_tensor_inputs` (names from
    CALLBACK_TENSOR_INPUTS) checked before any work; the names as a list. Errors name the argument."""
    if callback is not None and not callable(callback):
        raise TypeError(
            "callback_on_step_end must be a callable (pipe, step_index, timestep, callback_kwargs) -> dict "
            f"or None, got {type(callback).__name__}"
        )
    if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, Sequence):
        raise TypeError(
            f"callback_on_step_end_tensor_inputs must be a list of tensor names, got {type(tensor_inputs).__name__}"
        )
    names = list(tensor_inputs)
    unknown = [n for n in names if n not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs has names this pipeline does not pass: {unknown}; "
            f"known: {list(CALLBACK_TENSOR_INPUTS)}"
        )
    return names


def counted_progress(bar: tqdm, progress: Callable[[int], Any] | None) -> Callable[[int], None]:
    """The sampler's progress(k): one bar tick per step (the bar closed after its last step; a call that
    fails midway leaves it to tqdm's finaliser), then the caller's own progress callable."""

    def step_done(k: int) -> None:
        bar.update(1)
        if bar.total is not None and bar.n >= bar.total:
            bar.close()
        if progress is not None:
            progress(k)

    return step_done


def step_end_hook(
    pipe: Any, callback: Callable[..., Any], tensor_inputs: list[str]
) -> Callable[[int, Tensor, Tensor], Tensor]:
    """The sampler's on_step_end(k, t, latents) -> latents around a diffusers-style callback:
    `callback(pipe, k, t, {name: tensor for the requested names})` returns a dict whose "latents", when
    present, replace the latents for the next step (same shape, dtype and device: checked without a sync)."""

    def on_step_end(step_index: int, timestep: Tensor, latents: Tensor) -> Tensor:
        given = {"latents": latents}
        outputs = callback(pipe, step_index, timestep, {name: given[name] for name in tensor_inputs})
        if not isinstance(outputs, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict (callback_kwargs, possibly changed), got "
                f"{type(outputs).__name__} at step {step_index}"
            )
        unknown = sorted(set(outputs) - set(CALLBACK_TENSOR_INPUTS))
        if unknown:
            raise ValueError(
                f"callback_on_step_end returned {unknown} at step {step_index}; it may return "
                f"{list(CALLBACK_TENSOR_INPUTS)}"
            )
        new = outputs.get("latents", latents)
        if new is not latents:
            _check_like(new, latents, step_index)
        return new

    return on_step_end


def _check_like(new: Any, latents: Tensor, step_index: int) -> None:
    if not isinstance(new, Tensor):
        raise TypeError(f"callback_on_step_end returned latents of type {type(new).__name__} at step {step_index}")
    if new.shape != latents.shape or new.dtype != latents.dtype or new.device != latents.device:
        raise ValueError(
            f"callback_on_step_end returned latents {tuple(new.shape)} {new.dtype} on {new.device} at step "
            f"{step_index}; the sampler's are {tuple(latents.shape)} {latents.dtype} on {latents.device}"
        )
