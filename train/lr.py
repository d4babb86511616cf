"""AdamW and its schedule: linear warm-up to the peak, then linear decay to a floor (SELFE.md §4)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from selfe.train.config import OptimConfig


def lr_at(step: int, config: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): 0 -> lr over `warmup_steps`, then linear
    to `final_lr` at `decay_steps` (default `total_steps`), flat after."""
    warmup = config.warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    end = config.decay_steps if config.decay_steps is not None else total_steps
    span = max(end - warmup, 1)
    frac = min(max(step - warmup, 0) / span, 1.0)
    return config.lr + (config.final_lr - config.lr) * frac


def build_optimizer(
    params: Iterable[torch.nn.Parameter], config: OptimConfig, device: torch.device | None = None
) -> torch.optim.AdamW:
    """AdamW(betas, eps, weight decay) at the peak lr, fused or foreach (config.implementation; "auto": fused
    on CUDA); both take FSDP2's DTensor parameters."""
    fused = config.implementation == "fused" or (
        config.implementation == "auto" and device is not None and device.type == "cuda"
    )
    return torch.optim.AdamW(
        list(params),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR (state_dict holds its position) whose factor is `lr_at(step) / lr`."""
    return LambdaLR(optimizer, lambda step: lr_at(step, config, total_steps) / config.lr)
