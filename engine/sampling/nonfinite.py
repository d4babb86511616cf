"""Finding where sampling went NaN or Inf, at no cost while it does not.

A NaN image decodes to black (NaN -> uint8 0), so a model with broken weights would write black images and
report success. The pipeline checks its output once, after the loop (one host sync: no per-step check on the
fast path). Only if that check fails is the step found: the eager sampler runs again from the same noise and
generator states (`fork_generators`, taken before sampling), stopping at the first step whose latents are not
finite; with NaN weights that is the first step, so the search costs one step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from selfe.sampling.sampler import Generators, SamplerConfig, sample


class NonFiniteOutputWarning(UserWarning):
    """A pipeline call's latents or images hold NaN or Inf values."""


class _NonFiniteAt(Exception):
    def __init__(self, step: int):
        self.step = step


def fork_generators(generator: Generators) -> Generators:
    """Copies of the generator (or each of a list) in its current state: they draw the noise it is about to."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return torch.Generator(device=generator.device).set_state(generator.get_state())
    return [fork_generators(g) for g in generator]


def first_nonfinite_step(
    net: Any,
    noise: Tensor,
    cond: Any,
    null_cond: Any,
    config: SamplerConfig,
    num_tokens: int | None,
    generator: Generators,
) -> int | None:
    """The first step (0-based) whose latents hold a NaN or Inf when the eager sampler runs from `noise` with
    `generator` (forked before the run under study), or None if this run stays finite. Stops at that step."""
    done = [0]  # steps finished so far

    def finished(k: int) -> None:
        done[0] = k + 1

    def watched(x: Tensor, t: Tensor, s: Tensor, c: Any) -> Tensor:
        if not bool(x.isfinite().all()):  # the previous step's output
            raise _NonFiniteAt(done[0] - 1)
        return net(x, t, s, c)

    try:
        out = sample(watched, noise, cond, null_cond, config, num_tokens, generator, finished)
    except _NonFiniteAt as found:
        return found.step
    return None if bool(out.isfinite().all()) else config.steps - 1


def nonfinite_message(
    latents: Tensor, images: Tensor | None, find_step: Callable[[], int | None], steps: int
) -> str | None:
    """None when `images` (or, without them, `latents`) are finite: one host sync. Otherwise what went wrong
    and where: `find_step()` (e.g. `first_nonfinite_step` bound to the call's inputs) names the step."""
    if bool((latents if images is None else images).isfinite().all()):
        return None
    if images is not None and bool(latents.isfinite().all()):
        return "the autoencoder decoded finite latents to NaN or Inf pixels (check its weights)"
    step = find_step()
    if step is None:
        return (
            "the sampled latents hold NaN or Inf values, but an eager re-run from the same noise stays finite: the "
            "fast path's compiled step is at fault (fast=False avoids it)"
        )
    return (
        f"the sampled latents went NaN or Inf at step {step + 1} of {steps} (the network's output; check its "
        "weights, or the dtype: fp16 overflows where bf16 does not)"
    )
