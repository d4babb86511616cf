"""Time schedules of Self-E (docs/method.md §3 steps 2-3, §5): the length shift, t and s sampling, the sampling grid.

Convention: t in [0, 1], t = 0 is data, t = 1 is noise; x_t = (1 - t) x0 + t eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TimeShift:
    """The length-dependent shift `t = e^mu / (e^mu + 1/t_raw - 1)`, mu linear in the image token count.

    `anchors` are the paper's two points (tokens, mu): mu = 0.5 at 512 tokens, 1.15 at 4096.
    `mu`, when set, overrides the anchors (for inputs that are not token grids, such as the 2-D task).
    """

    anchors: tuple[tuple[int, float], tuple[int, float]] = ((512, 0.5), (4096, 1.15))
    mu: float | None = None

    def __post_init__(self) -> None:
        (l0, _), (l1, _) = self.anchors
        if l0 == l1:
            raise ValueError(f"time-shift anchors need two different token counts, got {self.anchors}")
        if self.mu is not None and not math.isfinite(self.mu):
            raise ValueError(f"time-shift mu must be finite, got {self.mu}")

    def mu_for(self, num_tokens: int | None) -> float:
        if self.mu is not None:
            return self.mu
        if num_tokens is None or num_tokens <= 0:
            raise ValueError("the time shift needs the image token count (or a fixed mu), got none")
        (l0, m0), (l1, m1) = self.anchors
        return m0 + (num_tokens - l0) * (m1 - m0) / (l1 - l0)


def shift_time(t: Tensor, mu: float) -> Tensor:
    """`e^mu / (e^mu + 1/t - 1)`: maps 0 -> 0 and 1 -> 1, pushes mass toward noise for mu > 0."""
    e = math.exp(mu)
    return e / (e + 1 / t - 1)


def sample_t(batch: int, mu: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Logit-normal t (z ~ N(0, 1), t = sigmoid(z)) followed by the length shift. Returns (batch,) float32."""
    z = torch.randn(batch, generator=generator, device=device)
    return shift_time(torch.sigmoid(z), mu)


def tau_at(iteration: int, tau_warmup: int) -> float:
    """tau rises linearly from 0 to 1 over the first `tau_warmup` iterations (1 at once if tau_warmup is 0)."""
    if tau_warmup <= 0:
        return 1.0
    return min(1.0, max(0, iteration) / tau_warmup)


def self_eval_count(batch: int) -> int:
    """Samples with s < t under the exact half/half split: the first batch // 2 (static for every step)."""
    return batch // 2


def sample_s(
    t: Tensor,
    tau: float,
    split: str = "half",
    self_eval_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Second time s <= t and the mask of samples drawn with s < t (the self-evaluated ones).

    With probability `1 - self_eval_prob` (split "bernoulli") or for the second half of the batch
    (split "half"), s = t; otherwise s ~ U((1 - tau) t, t). Returns (s (B,), self_mask (B,) bool).
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    batch = t.shape[0]
    u = torch.rand(batch, generator=generator, device=t.device)
    if split == "half":
        self_mask = torch.arange(batch, device=t.device) < self_eval_count(batch)
    elif split == "bernoulli":
        self_mask = torch.rand(batch, generator=generator, device=t.device) < self_eval_prob
    else:
        raise ValueError(f"s split must be 'half' or 'bernoulli', got {split!r}")
    s_low = t * (1 - tau * u)  # uniform on ((1 - tau) t, t]
    return torch.where(self_mask, s_low, t), self_mask


def sampling_grid(steps: int, mu: float, device=None) -> Tensor:
    """t_k = shift(linspace(1, 0, N + 1)): (N + 1,) float32 from 1 (noise) down to 0 (data)."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift_time(grid, mu).to(torch.float32)
