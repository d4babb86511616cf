"""The two energy-preserving renorms of Self-E, both one call of the fused `energy_preserving_mix` op.

- Training target (docs/method.md §3.7): y = x0 + lambda x_self, rescaled per sample to ||x0||.
- Sampling CFG (docs/method.md §5): V_g = V_c + (omega - 1)(V_c - V_u), rescaled per sample to ||V_c||.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from selfe.kernels.dispatch import get_op


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    value = torch.as_tensor(value, dtype=dtype, device=like.device)
    return value.expand(like.shape[0]) if value.dim() == 0 else value


def energy_preserving_target(
    x0: Tensor, x_self: Tensor, lam: Tensor, renorm: bool = True, kernel_backend: str | None = "torch"
) -> Tensor:
    """Self-E's regression target for x0_hat. x0, x_self: (B, ...); lam: (B,).

    renorm=True: `(x0 + lam x_self) * ||x0|| / ||x0 + lam x_self||`; the ablation renorm=False:
    `(x0 + lam x_self) / (1 + lam)`. Both equal x0 exactly where lam = 0.
    """
    if not renorm:
        shape = (-1,) + (1,) * (x0.dim() - 1)
        lam = lam.view(shape).to(x0.dtype)
        return (x0 + lam * x_self) / (1 + lam)
    mix = get_op("energy_preserving_mix", kernel_backend, x0.device)
    return mix(x0, x_self, torch.ones_like(lam), lam)


def is_cfg_scale(omega: Any) -> bool:
    """A usable EP-CFG omega: a finite real >= 0 (0 is unconditional, 1 no CFG; a negative one pushes away from
    the prompt: a typo, not a setting). True / False are not numbers here. The one check behind
    SamplerConfig.guidance and checkpoint.export_guidance, which becomes it on load."""
    return isinstance(omega, (int, float)) and not isinstance(omega, bool) and math.isfinite(omega) and omega >= 0


def energy_preserving_cfg(
    v_cond: Tensor, v_uncond: Tensor, omega: Tensor | float, kernel_backend: str | None = "torch"
) -> Tensor:
    """`V_g = V_c + (omega - 1)(V_c - V_u)` rescaled per sample to ||V_c||. v_*: (B, ...); omega scalar or (B,)."""
    omega = _per_sample(omega, v_cond)
    mix = get_op("energy_preserving_mix", kernel_backend, v_cond.device)
    return mix(v_cond, v_uncond, omega, 1 - omega)
