"""The shapes the compiled blocks see: a bounded, documented set of static shapes.

parallel.compile compiles every block with dynamic=False: each new shape is a graph of its own, specialised to
it (no dynamic-shape fallback, whose guards and kernels are slower), and dynamo's recompile limit is raised to
this set's size (`allow_compiles`), so no shape of the run can push a block past it.

Graphs per compiled code object = passes x image token counts x text lengths, where
  passes: live-network forwards L = 1 (main, with grad, batch B) + 1 with self-evaluation (its live
      unconditional pass, no grad, B // 2: the half split's static slice) + 1 with the auxiliary term on
      within the run (the fake pass, with grad, B // 2); the EMA copy's no-grad B // 2 pass is one more graph
      (its parameters need no grad). Without activation checkpointing each block class's forward holds
      L + 1 of them; with it the live blocks run through one CheckpointWrapper.forward, shared by the double
      and the single blocks, which then holds 2 L (and each block class the EMA's one).
  image token counts: procedural/synthetic one (square latents at data.resolution); cache/images one per
      aspect bucket (BucketConfig) at every resolution of the schedule, distinct counts only.
  text lengths: data.text_bucket x 2^k below the full length, and the full length; without text_bucket the
      full length alone. The full length is data.text_length (procedural/synthetic) or data.t5_max_length
      (images; online-encoded fake prompts), and a cache's own padded length counts as one more.
The half split keeps the self-evaluated half static; objective.s_split="bernoulli" draws a varying count
(a host sync and a new shape per count), which this set does not bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfe.train.config import TrainConfig

SMOKE_LATENT_FACTOR = 8  # procedural/synthetic latents, the smoke and FLUX.1 autoencoders: pixels per latent


@dataclass(frozen=True)
class CompileShapes:
    live_passes: int
    image_tokens: tuple[int, ...]
    text_lengths: tuple[int, ...]  # known lengths; plus `cache_length` more for a cache's own
    cache_length: int  # 1 where a cache's own padded text length may add one more, else 0
    activation_checkpointing: str  # the policy: none, selective, full ("auto" counts as checkpointing, the most)

    @property
    def text_count(self) -> int:
        return len(self.text_lengths) + self.cache_length

    @property
    def graphs_per_code(self) -> int:
        """The most graphs one compiled code object keeps over the run (see the module docstring)."""
        checkpointed = self.activation_checkpointing != "none"
        per_shape = 2 * self.live_passes if checkpointed else self.live_passes + 1
        return per_shape * len(self.image_tokens) * self.text_count


def bucket_lengths(bucket: int | None, full: int) -> tuple[int, ...]:
    """The text lengths `fit_to_text_bucket` can produce below and at `full`: bucket x 2^k < full, and full."""
    lengths = []
    length = bucket
    while length is not None and length < full:
        lengths.append(length)
        length *= 2
    return (*lengths, full)


def compile_shapes(config: TrainConfig, policy: str | None = None) -> CompileShapes:
    """The run's bounded shape set; `policy`: the activation checkpointing it runs (default: the config's, where
    "auto" counts as checkpointing until selfe.train.memory_plan resolves it)."""
    data, objective, patch = config.data, config.objective, config.model.patch_size
    policy = config.parallel.activation_checkpointing if policy is None else policy
    aux_in_run = objective.aux_start is not None and objective.aux_on(config.steps - 1)
    live_passes = 1 + int(objective.self_eval) + int(aux_in_run)
    if data.source in ("procedural", "synthetic"):
        side = data.resolution // SMOKE_LATENT_FACTOR // patch
        return CompileShapes(
            live_passes, (side * side,), bucket_lengths(data.text_bucket, data.text_length), 0,
            policy,
        )  # fmt: skip
    from selfe.train.data.buckets import BucketConfig

    factor = (data.pixel_factor if data.encoders == "pixels" else SMOKE_LATENT_FACTOR) * patch
    tokens = {
        (bucket.height // factor) * (bucket.width // factor)
        for resolution in data.resolution_schedule().resolutions
        for bucket in BucketConfig().buckets(resolution)
    }
    return CompileShapes(
        live_passes, tuple(sorted(tokens)), bucket_lengths(data.text_bucket, data.t5_max_length), 1,
        policy,
    )  # fmt: skip


def allow_compiles(shapes: CompileShapes) -> None:
    """Raise dynamo's per-code-object recompile limit (and its total) to fit every shape of the run."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, shapes.graphs_per_code)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * shapes.graphs_per_code)
