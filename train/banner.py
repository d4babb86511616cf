"""The trainer's start-up banner: what runs where, at what cost, on which data (rank 0 prints it)."""

from __future__ import annotations

import torch

from selfe.train.compile_shapes import SMOKE_LATENT_FACTOR
from selfe.train.config import TrainConfig
from selfe.train.metrics import self_eval_samples, step_flops


def nominal_step_flops(config: TrainConfig, world_size: int, iteration: int = 0) -> int:
    """Model FLOPs of one optimizer step over all ranks at data.resolution (square) and the source's full
    text length, at `iteration` (the auxiliary term's passes count once it is on). Bucketed text and smaller
    aspect buckets cost less; the metrics log counts each step's real shapes."""
    data, model = config.data, config.model
    pixels = data.encoders == "pixels" and data.source in ("cache", "images")
    factor = data.pixel_factor if pixels else SMOKE_LATENT_FACTOR
    side = data.resolution // factor // model.patch_size
    text = data.text_length if data.source in ("procedural", "synthetic") else data.t5_max_length
    b = data.batch_size
    n_self = self_eval_samples(b, config.objective.s_split, config.objective.self_eval)
    per_micro = step_flops(model, b, side * side, text, n_self, config.objective.aux_on(iteration))["total"]
    return per_micro * config.optim.grad_accum * world_size


def startup_banner(
    config: TrainConfig,
    *,
    parameters: int,
    world_size: int,
    device: torch.device,
    param_dtype: torch.dtype,
    peak_flops: float | None,
    flops_per_step: int,
    data_size: int | None,
    compile_graphs: int | None,
    activation_checkpointing: str,
    estimated_peak_bytes: int | None = None,
    communication: str | None = None,
) -> str:
    """The banner's lines. compile_graphs: the static-shape bound per compiled block (None: not compiled);
    activation_checkpointing: the policy the run uses and estimated_peak_bytes its memory estimate per rank,
    where one is known (selfe.train.memory_plan); communication: the per-step volume (world size > 1)."""
    data, parallel = config.data, config.parallel
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = f"{peak_flops / 1e12:.0f} TFLOP/s per device" if peak_flops else f"n/a (no known peak for {name})"
    memory = f"{estimated_peak_bytes / 2**30:.1f} GiB per rank" if estimated_peak_bytes is not None else "n/a"
    compiled = (
        f"{parallel.compile_backend}, static shapes, at most {compile_graphs} graphs per block"
        if compile_graphs is not None
        else "off"
    )
    fp8 = config.fp8.recipe if config.fp8.enabled else "off"
    size = f"{data_size} samples" if data_size is not None else "one fixed batch"
    global_batch = data.batch_size * world_size * config.optim.grad_accum
    lines = [
        f"selfe train {config.name}: {config.steps} steps -> {config.run_dir}",
        f"  model      {config.model.name}, {parameters / 1e6:.2f}M parameters",
        f"  devices    {world_size} x {name} (world size {world_size})",
        f"  precision  {str(param_dtype).removeprefix('torch.')} parameters, fp32 gradient reduce; FP8 {fp8}",
        f"  memory     activation checkpointing {activation_checkpointing}; estimated peak {memory}",
        f"  compile    {compiled}",
        f"  compute    {flops_per_step / 1e12:.4g} TFLOP per step at {data.resolution}^2; MFU against {peak}",
        f"  data       {data.source}: {size}; global batch {global_batch} = {data.batch_size} per rank x "
        f"{world_size} ranks x {config.optim.grad_accum} micro-batches; text bucket {data.text_bucket or 'off'}; "
        f"{data.prefetch_steps} steps prefetched",
    ]
    if communication is not None:
        lines.append(f"  network    {communication}")
    return "\n".join(lines)
