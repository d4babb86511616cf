"""AdamW and its schedule: linear warm-up to the peak, then linear decay to a floor (SELFE.md §4)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from selfe.train.config import OptimConfig

log = logging.getLogger(__name__)


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
    optimizer = torch.optim.AdamW(
        list(params),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )
    optimizer.register_load_state_dict_pre_hook(_config_wins_over_saved_settings)
    return optimizer


# The learning rate is the schedule's (its state is saved beside the optimizer's); every other group
# setting is the config's, so a resume may change the implementation (fused on a GPU, foreach on a
# CPU) or a hyperparameter. Rewriting the saved groups before the load also moves the saved `step`
# counters where the new implementation keeps them (fused: fp32 on the parameter's device).
_SCHEDULE_KEYS = ("params", "lr", "initial_lr")


def _config_wins_over_saved_settings(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    groups = state_dict["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        return state_dict  # torch's own check names this mismatch
    changed = set()
    merged = []
    for saved, live in zip(groups, optimizer.param_groups):
        settings = {k: v for k, v in live.items() if k not in _SCHEDULE_KEYS}
        changed |= {k for k, v in settings.items() if k in saved and saved[k] != v}
        merged.append({**saved, **settings})
    if changed and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.info("optimizer settings from the config, not the checkpoint: %s", ", ".join(sorted(changed)))
    return {**state_dict, "param_groups": merged}


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR (state_dict holds its position) whose factor is `lr_at(step) / lr`."""
    return LambdaLR(optimizer, lambda step: lr_at(step, config, total_steps) / config.lr)
