"""The any-step sampler (docs/method.md §5): one network, any number of steps.

`denoise_step` is one step with every per-step scalar passed as a tensor and no data-dependent
Python control flow or host-device sync, so a later engine can compile it and capture it in a CUDA
graph once per shape and replay it for every step count. `sample` is the plain loop around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfe.kernels.dispatch import BACKENDS as KERNEL_BACKENDS
from selfe.method import condition_tree
from selfe.method.objective import DualTimeNetwork
from selfe.method.renorm import energy_preserving_cfg, is_cfg_scale
from selfe.method.schedule import TimeShift, sampling_grid

S_POLICIES = ("next", "current", "midpoint", "fixed")
METHODS = ("ddim", "euler")

# One generator for the whole batch, or one per sample (diffusers' list of generators).
Generators = torch.Generator | Sequence[torch.Generator] | None
# Called after step k as on_step_end(k, t_k, latents); returns the latents the next step starts from.
StepEnd = Callable[[int, Tensor, Tensor], Tensor]


def draw_noise(shape: Sequence[int], generator: Generators, device, dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise of `shape` on `device`, drawn on the generator's own device. With a list of
    generators, sample b's slice comes from generator b, so an image does not depend on the rest of its batch."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"a list of generators needs one per sample: got {len(generators)} for {shape[0]} samples")
    slices = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat([z.to(device) for z in slices])


@dataclass
class SamplerConfig:
    """How to sample. Defaults are the paper's: s_k = t_{k+1}, EP-CFG with omega 5, stochastic DDIM (eta 1)."""

    steps: int = 2
    method: str = "ddim"  # "ddim" (eta-DDIM, paper appendix) or "euler"
    eta: float = 1.0
    guidance: float | None = 5.0  # omega of energy-preserving CFG; None: no CFG (one forward per step)
    s_policy: str = "next"  # s_k = t_{k+1} ("next"), t_k ("current": flow matching), "midpoint", or "fixed"
    s_fixed: float = 0.5  # s for the "fixed" policy, clamped into [t_{k+1}, t_k]; 0.5 is best for 1 step w/o CFG
    time_shift: TimeShift = field(default_factory=TimeShift)
    kernel_backend: str | None = "auto"

    def __post_init__(self) -> None:
        # Each field is checked by type and value, named as SamplerConfig.<field>: a config.json "sampler"
        # entry lands here, and a string, a bool or a NaN must fail now, not at the first sampling call.
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"SamplerConfig.method (sampler method) must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.s_policy, str) or self.s_policy not in S_POLICIES:
            raise ValueError(f"SamplerConfig.s_policy must be one of {S_POLICIES}, got {self.s_policy!r}")
        if not _is_number(self.eta) or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"SamplerConfig.eta must be a number in [0, 1], got {self.eta!r}")
        if self.guidance is not None and not is_cfg_scale(self.guidance):
            raise ValueError(
                f"SamplerConfig.guidance must be a finite number >= 0 or None (no CFG), got {self.guidance!r}"
            )
        if not _is_number(self.s_fixed) or not 0.0 <= self.s_fixed <= 1.0:
            raise ValueError(f"SamplerConfig.s_fixed must be a number in [0, 1], got {self.s_fixed!r}")
        self.time_shift = _checked_time_shift(self.time_shift)
        if self.kernel_backend is not None and (
            not isinstance(self.kernel_backend, str) or self.kernel_backend not in KERNEL_BACKENDS
        ):
            raise ValueError(
                f"SamplerConfig.kernel_backend must be one of {KERNEL_BACKENDS} or None, got {self.kernel_backend!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(value: Any) -> bool:
    """A real int or float; True / False are not numbers here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_time_shift(value: Any) -> TimeShift:
    """A TimeShift (a dict from config.json is built into one) with numeric anchors and a finite or None mu."""
    if isinstance(value, dict):
        try:
            value = TimeShift(**value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"SamplerConfig.time_shift is not a valid TimeShift ({err}), got {value!r}") from err
    if not isinstance(value, TimeShift):
        raise ValueError(
            f"SamplerConfig.time_shift must be a TimeShift or a dict of its fields, got {type(value).__name__}"
        )
    anchors = value.anchors
    if not (
        isinstance(anchors, (list, tuple))
        and len(anchors) == 2
        and all(isinstance(a, (list, tuple)) and len(a) == 2 and all(map(_is_number, a)) for a in anchors)
        and all(math.isfinite(x) for a in anchors for x in a)
    ):
        raise ValueError(f"SamplerConfig.time_shift.anchors must be two finite (tokens, mu) pairs, got {anchors!r}")
    if value.mu is not None and not (_is_number(value.mu) and math.isfinite(value.mu)):
        raise ValueError(f"SamplerConfig.time_shift.mu must be a finite number or None, got {value.mu!r}")
    return value


def s_grid(t_grid: Tensor, policy: str = "next", s_fixed: float = 0.5) -> Tensor:
    """The second time of each step, s_k in [t_{k+1}, t_k]. t_grid: (N + 1,) -> (N,)."""
    t_cur, t_next = t_grid[:-1], t_grid[1:]
    if policy == "next":
        return t_next.clone()
    if policy == "current":
        return t_cur.clone()
    if policy == "midpoint":
        return (t_cur + t_next) / 2
    if policy == "fixed":
        return torch.minimum(torch.maximum(torch.full_like(t_cur, s_fixed), t_next), t_cur)
    raise ValueError(f"s_policy must be one of {S_POLICIES}, got {policy!r}")


def guided_velocity(
    net: DualTimeNetwork,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    cond: Any,
    null_cond: Any,
    guidance: Tensor | None,
    kernel_backend: str | None = "auto",
) -> Tensor:
    """V at (x, t, s); with guidance, the conditional and unconditional branches run as one batched forward."""
    if guidance is None:
        return net(x, t, s, cond)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), condition_tree.concat(cond, null_cond))
    v_cond, v_uncond = both.chunk(2)
    return energy_preserving_cfg(v_cond, v_uncond, guidance, kernel_backend)


def denoise_step(
    net: DualTimeNetwork,
    x: Tensor,
    t_cur: Tensor,
    t_next: Tensor,
    s_cur: Tensor,
    cond: Any,
    null_cond: Any,
    guidance: Tensor | None,
    noise: Tensor,
    eta: Tensor,
    method: str = "ddim",
    kernel_backend: str | None = "auto",
) -> Tensor:
    """One step from t_cur to t_next. x, noise: (B, ...); t_cur, t_next, s_cur: (B,); eta: 0-d tensor.

    DDIM (alpha = 1 - t, sigma = t): x0_hat = x - sigma_k V, eps_hat = x + alpha_k V,
    b = max(sigma_{k+1} - eta (sigma_k - sigma_{k+1}) sigma_{k+1} / sigma_k, 0),
    x <- alpha_{k+1} x0_hat + b eps_hat + sqrt(sigma_{k+1}^2 - b^2) z. At t_next = 0 this is x0_hat.
    Euler: x <- x - (t_k - t_{k+1}) V.
    """
    v = guided_velocity(net, x, t_cur, s_cur, cond, null_cond, guidance, kernel_backend)
    shape = (-1,) + (1,) * (x.dim() - 1)
    sig_k, sig_n = t_cur.view(shape).to(x.dtype), t_next.view(shape).to(x.dtype)
    if method == "euler":
        return x - (sig_k - sig_n) * v
    if method != "ddim":
        raise ValueError(f"sampler method must be one of {METHODS}, got {method!r}")
    x0_hat = x - sig_k * v
    eps_hat = x + (1 - sig_k) * v
    b = (sig_n - eta * (sig_k - sig_n) * sig_n / sig_k).clamp_min(0)
    fresh = (sig_n.square() - b.square()).clamp_min(0).sqrt()
    return (1 - sig_n) * x0_hat + b * eps_hat + fresh * noise


@torch.no_grad()
def sample(
    net: DualTimeNetwork,
    noise: Tensor,
    cond: Any,
    null_cond: Any = None,
    config: SamplerConfig | None = None,
    num_tokens: int | None = None,
    generator: Generators = None,
    progress: Callable[[int], Any] | None = None,
    on_step_end: StepEnd | None = None,
) -> Tensor:
    """Run `config.steps` steps from `noise` (x at t = 1) to a clean sample. Deterministic for a given generator.

    generator: the per-step noise's source (eta-DDIM), one for the batch or one per sample (`draw_noise`).
    num_tokens: image tokens per sample for the length shift (unless the config fixes mu).
    progress: optional callable(k) called after step k (a progress bar's update).
    on_step_end: optional callable(k, t_k, x) -> x called after step k, before `progress`, with t_k the
        step's start time (a 0-d tensor) and x the latents after it; what it returns is the next step's x.
    """
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable taking the step index, got {type(progress).__name__}")
    config = config or SamplerConfig()
    if config.guidance is not None and null_cond is None:
        raise ValueError("guidance is set but no null condition was given (pass null_cond or guidance=None)")
    B, device = noise.shape[0], noise.device
    t_grid = sampling_grid(config.steps, config.time_shift.mu_for(num_tokens), device=device)
    s_values = s_grid(t_grid, config.s_policy, config.s_fixed)
    guidance = None if config.guidance is None else torch.full((B,), float(config.guidance), device=device)
    eta = torch.tensor(config.eta, device=device, dtype=noise.dtype)
    x = noise
    for k in range(config.steps):
        z = draw_noise(noise.shape, generator, device, noise.dtype)
        x = denoise_step(
            net,
            x,
            t_grid[k].expand(B),
            t_grid[k + 1].expand(B),
            s_values[k].expand(B),
            cond,
            null_cond,
            guidance,
            z,
            eta,
            config.method,
            config.kernel_backend,
        )
        if on_step_end is not None:
            x = on_step_end(k, t_grid[k], x)
        if progress is not None:
            progress(k)
    return x
