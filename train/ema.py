"""Exponential moving average of a network's parameters, updated in place after each optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `model` (a frozen copy) at `decay * ema + (1 - decay) * live` after every `update`.

    `warmup` uses decay_k = min(decay, (1 + k) / (10 + k)) so the average is not dominated by the
    random initial weights in short runs; set it False for the plain constant decay (the paper's). The EMA
    network gives the self-evaluation its conditional estimate, so the warm-up changes the training target
    early on, not only the exported weights (selfe.train.config.EMAConfig).
    """

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(net).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, net: nn.Module, apply: torch.Tensor | None = None) -> None:
        """One EMA step towards `net`. `apply` (a bool tensor on the device): step only where it is true,
        decided on the device, so that a skipped optimizer step costs no host read; `num_updates` is then
        a device tensor (int() reads it, at a checkpoint)."""
        ema_params = list(self.model.parameters())
        live_params = [p.detach() for p in net.parameters()]
        if apply is None:
            torch._foreach_lerp_(ema_params, live_params, 1.0 - self.current_decay())
            self.num_updates += 1
        else:
            k = torch.as_tensor(self.num_updates, dtype=torch.float64, device=apply.device)
            decay = ((1 + k) / (10 + k)).clamp(max=self.decay) if self.warmup else torch.full_like(k, self.decay)
            weight = torch.where(apply, 1.0 - decay, 0.0).to(ema_params[0].dtype)
            torch._foreach_lerp_(ema_params, live_params, weight)
            self.num_updates = k + apply.to(k.dtype)
        for ema_buf, buf in zip(self.model.buffers(), net.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
