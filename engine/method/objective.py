"""The Self-E training objective (docs/method.md §3): learning from data and self-evaluation in one loss.

Written against a network's call signature only, `net(x, t, s, cond) -> V`, so the MMDiT and the
2-D task's MLP run the same code. Flow matching is this objective with `self_eval=False` (s = t always).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from selfe.method import condition_tree
from selfe.method.renorm import energy_preserving_target
from selfe.method.schedule import TimeShift, sample_s, sample_t, self_eval_count, tau_at

# [ours] c_fake = prefix + caption (the paper leaves the string open; docs/method.md)
DEFAULT_FAKE_PROMPT_PREFIX = "fake image, "


def check_fake_prompt_prefix(prefix: object) -> None:
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"fake_prompt_prefix must be a non-blank string (else c_fake equals c), got {prefix!r}")


class DualTimeNetwork(Protocol):
    def __call__(self, x: Tensor, t: Tensor, s: Tensor, cond: Any) -> Tensor: ...


@dataclass
class ObjectiveConfig:
    """Every knob of the objective, in docs/method.md's terms; [ours] marks choices the paper leaves open."""

    self_eval: bool = True  # False: plain flow matching (s = t for every sample), everything else equal
    caption_dropout: float = 0.1  # p_drop [ours: 0.1]; the null condition is the encoding of ""
    time_shift: TimeShift = field(default_factory=TimeShift)
    s_split: str = "half"  # [ours] "half": exactly the first B//2 samples get s < t (static shapes); "bernoulli": paper
    self_eval_prob: float = 0.5  # P(s < t) under the "bernoulli" split
    tau_warmup: int = 300_000  # iterations over which tau rises 0 -> 1 (paper: 300k)
    energy_preserving: bool = True  # False: the no-renorm ablation, target = y / (1 + lambda)
    fresh_self_eval_noise: bool = True  # [ours] eps' for x_s_hat is fresh noise (False: reuse eps)
    aux_start: int | None = 550_000  # iteration at which the fake-score term switches on (None: never)
    aux_k: float = 0.9  # D = k (g_u - g_c) + (1 - k)(g_f - g_c)
    aux_weight: float = 1.0  # weight of L_fake [ours: 1.0]
    # [ours, ablation knobs; the defaults are the paper's] x_self = x0_hat - self_eval_guidance * D (1: the
    # paper; 0: no guidance direction, the target pulls toward x0_hat only); and whether a row whose caption
    # was dropped is self-evaluated (its g_c and g_u are then both unconditional) or, False, gets lambda = 0:
    # a plain flow-matching row (docs/method.md §3).
    self_eval_guidance: float = 1.0
    self_eval_dropped: bool = True
    # c_fake = prefix + caption [ours: the exact string]; a dropped caption's c_fake is the bare prefix (its
    # x0_hat was drawn under phi). The data sources encode it; the objective sees only the encodings.
    fake_prompt_prefix: str = DEFAULT_FAKE_PROMPT_PREFIX
    kernel_backend: str | None = "auto"  # implementation of the energy-preserving renorm (selfe.kernels)

    def __post_init__(self) -> None:
        if isinstance(self.time_shift, dict):
            self.time_shift = TimeShift(**self.time_shift)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.s_split not in ("half", "bernoulli"):
            raise ValueError(f"s_split must be 'half' or 'bernoulli', got {self.s_split!r}")
        if not 0.0 <= self.self_eval_prob <= 1.0:
            raise ValueError(f"self_eval_prob must lie in [0, 1], got {self.self_eval_prob}")
        if self.tau_warmup < 0:
            raise ValueError(f"tau_warmup must be >= 0, got {self.tau_warmup}")
        if not 0.0 <= self.aux_k <= 1.0:
            raise ValueError(f"aux_k must lie in [0, 1], got {self.aux_k}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if not self.self_eval_guidance >= 0:
            raise ValueError(f"self_eval_guidance must be >= 0, got {self.self_eval_guidance}")
        check_fake_prompt_prefix(self.fake_prompt_prefix)

    def aux_on(self, iteration: int) -> bool:
        return self.self_eval and self.aux_start is not None and iteration >= self.aux_start

    def to_dict(self) -> dict:
        return asdict(self)


def clean_estimate(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """G = x_t - t V: the clean-sample estimate, always at the current time t. t: (B,)."""
    return x_t - _bcast(t, x_t) * v


def self_eval_lambda(t: Tensor, s: Tensor) -> Tensor:
    """lambda = t / (1 - t) - s / (1 - s): zero where s = t; unclamped, as in the paper."""
    return t / (1 - t) - s / (1 - s)


def loss_weight(t: Tensor) -> Tensor:
    """w(t) = 1 / t^2: makes the x0-space loss equal the velocity MSE when s = t."""
    return 1 / t.square()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def _mean_per_sample(x: Tensor) -> Tensor:
    """Mean over all non-batch dims, accumulated in float32 (float64 for float64 inputs)."""
    return x.flatten(1).to(torch.promote_types(x.dtype, torch.float32)).mean(dim=1)


class SelfELoss:
    """The loss of one training step. Call with the live network, the EMA network and a batch.

    batch keys: "x0" (B, ...) clean latents; "cond", "null_cond" (B-batched conditions, see
    selfe.method.condition_tree); when the auxiliary term is on, "fake_cond" (c_fake of each caption) and, with
    caption dropout, "fake_null_cond" (c_fake of the empty caption, for the dropped ones); "num_tokens"
    (image tokens per sample, for the length shift) unless the config fixes mu.
    """

    def __init__(self, config: ObjectiveConfig | None = None):
        self.config = config or ObjectiveConfig()

    def __call__(
        self,
        net: DualTimeNetwork,
        ema_net: DualTimeNetwork,
        batch: dict[str, Any],
        iteration: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        x0 = batch["x0"]
        B, device = x0.shape[0], x0.device
        cond, null = batch["cond"], batch["null_cond"]
        aux_on = cfg.aux_on(iteration)
        fake = batch.get("fake_cond") if aux_on else None
        needed = ("fake_cond", "fake_null_cond") if cfg.caption_dropout > 0 else ("fake_cond",)
        for key in needed if aux_on else ():
            if batch.get(key) is None:
                raise ValueError(f"the auxiliary term is on at iteration {iteration} but the batch has no {key!r}")

        dropped = None
        if cfg.caption_dropout > 0:
            dropped = torch.rand(B, generator=generator, device=device) < cfg.caption_dropout
            cond = condition_tree.where(dropped, null, cond)
            if aux_on:  # the sample was drawn under phi: its fake prompt carries no caption either
                fake = condition_tree.where(dropped, batch["fake_null_cond"], fake)
        t, s, self_mask = self._sample_times(B, batch.get("num_tokens"), iteration, generator, device)

        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x_t = (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * eps
        v = net(x_t, t, s, cond)

        # delta = x_target - x0 is zero where s = t; the loss is taken in velocity form,
        # w(t) |x0_hat - x_target|^2 = |V - (eps - x0 - delta / t)|^2, which keeps precision at small t.
        delta, lam = torch.zeros_like(x0), torch.zeros_like(t)
        loss_fake = x0.new_zeros(())
        if cfg.self_eval:
            # The self-evaluated samples: a static slice under the half split (no host sync).
            index = slice(0, self_eval_count(B)) if cfg.s_split == "half" else self_mask.nonzero().squeeze(1)
            # A Bernoulli draw can pick none (1 / 2^B per micro-batch). The passes still run, on row 0 as a
            # stand-in whose results are dropped: every rank runs the same forwards (FSDP's collectives),
            # and the step is then plain flow matching.
            stand_in = isinstance(index, Tensor) and index.numel() == 0
            if stand_in:
                index = torch.zeros(1, dtype=torch.long, device=device)
            rows = (torch.arange(B, device=device)[index],)
            x0_hat_i = clean_estimate(v[index], x_t[index], t[index]).detach()
            noise_i = (
                torch.randn(x0_hat_i.shape, generator=generator, device=device, dtype=x0.dtype)
                if cfg.fresh_self_eval_noise
                else eps[index]
            )
            s_i = s[index]
            x_s_hat = (1 - _bcast(s_i, x0_hat_i)) * x0_hat_i + _bcast(s_i, x0_hat_i) * noise_i
            conds_i = {
                "cond": condition_tree.select(cond, index),
                "null": condition_tree.select(null, index),
                "fake": condition_tree.select(fake, index) if aux_on else None,
            }
            v_fake = None
            if aux_on:
                # The fake branch learns the posterior mean of the model's own samples:
                # w(s) |G(x_s_hat, s, s, c_fake) - x0_hat|^2 = |V_f - (eps' - x0_hat)|^2. The same pass,
                # detached, is g_f in D: x_s_hat is detached, so one forward serves both.
                v_fake = net(x_s_hat, s_i, s_i, conds_i["fake"])
                loss_fake = _mean_per_sample((v_fake - (noise_i - x0_hat_i)).square()).mean()
                v_fake = v_fake.detach()
            x_self = self._self_evaluate(net, ema_net, x0_hat_i, x_s_hat, s_i, conds_i, v_fake)
            lam_i = self_eval_lambda(t[index].double(), s_i.double())  # t / (1 - t) loses digits near 1 in fp32
            lam_i = lam_i.to(torch.promote_types(x0.dtype, torch.float32))
            if dropped is not None and not cfg.self_eval_dropped:
                lam_i = lam_i.masked_fill(dropped[index], 0.0)  # lambda = 0: the target is x0 itself
            x0_i = x0[index]
            target_i = energy_preserving_target(x0_i, x_self, lam_i, cfg.energy_preserving, cfg.kernel_backend)
            if stand_in:
                loss_fake = loss_fake * 0.0  # the fake branch's backward still runs, contributing nothing
            else:
                delta = delta.index_put(rows, target_i - x0_i)
                lam = lam.index_put(rows, lam_i.to(lam.dtype))

        v_target = eps - x0 - delta / _bcast(t, x0)
        per_sample = _mean_per_sample((v - v_target).square())
        loss = per_sample.mean() + (cfg.aux_weight * loss_fake if aux_on else 0.0)
        metrics = {
            "loss": loss.detach(),
            "loss_data": _masked_mean(per_sample.detach(), ~self_mask),
            "loss_self": _masked_mean(per_sample.detach(), self_mask),
            "lambda_mean": _masked_mean(lam, self_mask),  # over the self-evaluated samples (s < t)
            "frac_self": (s < t).float().mean(),
            "loss_fake": loss_fake.detach(),  # zero while the auxiliary term is off
            "aux_on": torch.tensor(float(aux_on)),
        }
        return loss, metrics

    def _sample_times(
        self, batch: int, num_tokens: int | None, iteration: int, generator: torch.Generator | None, device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """t from the shifted logit-normal; s < t for the self-evaluated samples. Returns (t, s, self_mask)."""
        cfg = self.config
        t = sample_t(batch, cfg.time_shift.mu_for(num_tokens), generator, device)
        if not cfg.self_eval:
            return t, t, torch.zeros(batch, dtype=torch.bool, device=device)
        s, self_mask = sample_s(t, tau_at(iteration, cfg.tau_warmup), cfg.s_split, cfg.self_eval_prob, generator)
        return t, s, self_mask

    @torch.no_grad()
    def _self_evaluate(
        self,
        net: DualTimeNetwork,
        ema_net: DualTimeNetwork,
        x0_hat: Tensor,
        x_s_hat: Tensor,
        s: Tensor,
        conds: dict[str, Any],
        v_fake: Tensor | None = None,
    ) -> Tensor:
        """x_self = x0_hat - w D (w = self_eval_guidance, 1 in the paper), D = g_u - g_c (EMA conditional, live
        unconditional), mixed with the fake direction g_f - g_c (g_f from `v_fake`, the live network's detached
        c_fake velocity) when the auxiliary term is on. No gradient reaches either network from here."""
        g_c = clean_estimate(ema_net(x_s_hat, s, s, conds["cond"]), x_s_hat, s)
        g_u = clean_estimate(net(x_s_hat, s, s, conds["null"]), x_s_hat, s)
        direction = g_u - g_c
        if v_fake is not None:
            g_f = clean_estimate(v_fake, x_s_hat, s)
            direction = self.config.aux_k * direction + (1 - self.config.aux_k) * (g_f - g_c)
        return x0_hat - self.config.self_eval_guidance * direction


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)
