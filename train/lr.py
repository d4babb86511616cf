"""AdamW and its schedule: linear warm-up to the peak, then linear decay to a floor (docs/method.md §4)."""

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


def step_if(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() where the 0-dim bool tensor `finite` is true; where it is false nothing changes
    (parameters, moments, step counts). Fused AdamW decides on the device: its kernel skips the update
    when `found_inf` is set and the step counts are restored, so the host never reads `finite`. Foreach
    AdamW has no such input: the host reads the flag (one sync per step; fused is the default on CUDA)."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = (~finite).to(torch.float32)  # 0-dim: fused AdamW subtracts it from 0-dim steps
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()


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
    if changed and _logs():
        log.info("optimizer settings from the config, not the checkpoint: %s", ", ".join(sorted(changed)))
    return {**state_dict, "param_groups": merged}


def _logs() -> bool:
    """Whether this process logs a resume's notes: rank 0, or the only process."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR (state_dict holds its position) whose factor is `lr_at(step) / lr`."""
    return LambdaLR(optimizer, lambda step: lr_at(step, config, total_steps) / config.lr)


def load_schedule(scheduler: LambdaLR, state: dict) -> None:
    """The schedule's position from a checkpoint, its shape from the config it was built with.

    LambdaLR's own load would also restore the saved peak (`base_lrs`), so a resume with another
    optim.lr would mix the old peak into the new shape. The learning rate of the next step is set from
    the config, as an uninterrupted run with this config would have it; a change from the checkpoint's
    (optim.lr, final_lr, warmup_steps, decay_steps, or `steps` with decay_steps unset) is logged."""
    optimizer = scheduler.optimizer
    saved = [group["lr"] for group in optimizer.param_groups]  # the checkpoint's, restored with the optimizer
    peaks = list(scheduler.base_lrs)
    scheduler.load_state_dict(state)
    scheduler.base_lrs = peaks
    for group, peak, factor in zip(optimizer.param_groups, peaks, scheduler.lr_lambdas):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)  # LambdaLR's own formula: bit-equal when unchanged
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    now = scheduler._last_lr
    if any(abs(a - b) > 1e-6 * max(abs(a), abs(b)) for a, b in zip(saved, now)):
        if _logs():
            log.warning(
                "the learning rate resumes at %.3g where the checkpoint's schedule had %.3g: the config's "
                "optim.lr / final_lr / warmup_steps / decay_steps (or steps, when decay_steps is unset) "
                "changed; set optim.decay_steps to the first run's steps to keep its decay",
                now[0],
                saved[0],
            )
