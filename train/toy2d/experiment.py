"""Train flow matching and Self-E with the same objective code, network and budget; sample at several step counts."""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from selfe.method.objective import ObjectiveConfig, SelfELoss
from selfe.method.schedule import TimeShift
from selfe.sampling.sampler import SamplerConfig, sample
from selfe.train.ema import EMA
from selfe.train.toy2d.data import RingMixture
from selfe.train.toy2d.metrics import evaluate_samples
from selfe.train.toy2d.network import DualTimeMLP

log = logging.getLogger("selfe.toy2d")

METHODS = ("flow_matching", "selfe")


@dataclass
class Toy2DConfig:
    """The whole 2-D experiment. Both methods share every field; only `self_eval` differs between them."""

    iterations: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    width: int = 128
    depth: int = 3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    tau_warmup_fraction: float = 0.25  # tau rises 0 -> 1 over this share of the run
    aux_start_fraction: float | None = 0.775  # the fake-score term switches on here (paper: 550k of 710k)
    aux_k: float = 0.9
    fresh_self_eval_noise: bool = True  # [ours] eps' of x_s_hat is fresh noise (False: reuse the eps of x_t)
    time_shift_mu: float = 0.0  # 2-D points are no token grid: a fixed mu (0 = no shift)
    steps: tuple[int, ...] = (1, 2, 4, 8, 50)
    # EP-CFG omega for both methods. None (no CFG) by default: on 2-D points, omega = 5 rotates the
    # velocity far off the data for both methods (measured table in the README).
    guidance: float | None = None
    sampler_method: str = "ddim"
    eval_samples: int = 4000
    seed: int = 0
    log_every: int = 500
    data: RingMixture = field(default_factory=RingMixture)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 2:
            raise ValueError(f"need iterations >= 1 and batch_size >= 2, got {self.iterations}, {self.batch_size}")
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be a non-empty list of integers >= 1, got {self.steps}")
        for name in ("width", "depth", "eval_samples", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # `not x > 0` and friends: NaN fails every comparison, so it lands in the error too.
        if not (0 < self.lr < math.inf and 0 < self.grad_clip < math.inf):
            raise ValueError(f"lr and grad_clip must be finite and > 0, got {self.lr}, {self.grad_clip}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        # Shares of the run (int(fraction * iterations) overflows on a huge one); aux_start_fraction=None: never.
        for name in ("tau_warmup_fraction", "aux_start_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not abs(self.time_shift_mu) <= 700:  # the shift takes math.exp(mu), which overflows past 709
            raise ValueError(f"time_shift_mu must lie in [-700, 700], got {self.time_shift_mu}")
        if not -(2**63) <= self.seed <= 2**64 - 1 - 100:  # seed + 100 seeds a torch.Generator (64 bits)
            raise ValueError(f"seed must lie in [-2**63, 2**64 - 101], got {self.seed}")
        # The rest (caption_dropout, aux_k, guidance, sampler_method) is checked by the
        # configs it feeds, built here so that a bad value fails before training rather than after it.
        self.objective(self_eval=True)
        self.sampler("selfe", min(self.steps))

    def objective(self, self_eval: bool) -> ObjectiveConfig:
        aux = None if self.aux_start_fraction is None else int(self.aux_start_fraction * self.iterations)
        return ObjectiveConfig(
            self_eval=self_eval,
            caption_dropout=self.caption_dropout,
            time_shift=TimeShift(mu=self.time_shift_mu),
            tau_warmup=int(self.tau_warmup_fraction * self.iterations),
            aux_start=aux,
            aux_k=self.aux_k,
            fresh_self_eval_noise=self.fresh_self_eval_noise,
            kernel_backend="torch",
        )

    def sampler(self, method: str, steps: int) -> SamplerConfig:
        # A flow-matching network only ever saw s = t, so it samples with s = t; Self-E with s_k = t_{k+1}.
        return SamplerConfig(
            steps=steps,
            method=self.sampler_method,
            guidance=self.guidance,
            s_policy="current" if method == "flow_matching" else "next",
            time_shift=TimeShift(mu=self.time_shift_mu),
            kernel_backend="torch",
        )

    def to_dict(self) -> dict:
        return asdict(self)


def train_method(
    method: str, x_train: Tensor, y_train: Tensor, num_conditions: int, config: Toy2DConfig
) -> tuple[DualTimeMLP, list[dict]]:
    """Train one method; returns the EMA network and the logged metrics."""
    torch.manual_seed(config.seed)  # same initial weights for both methods
    gen = torch.Generator().manual_seed(config.seed + 1)
    net = DualTimeMLP(num_conditions, config.width, config.depth)
    ema = EMA(net, config.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    loss_fn = SelfELoss(config.objective(self_eval=method == "selfe"))
    history: list[dict] = []
    start = time.perf_counter()
    for it in range(config.iterations):
        idx = torch.randint(x_train.shape[0], (config.batch_size,), generator=gen)
        labels = y_train[idx]
        batch = {
            "x0": x_train[idx],
            "cond": labels,
            "null_cond": torch.full_like(labels, net.null_label),
            "fake_cond": net.fake_labels(labels),
            "fake_null_cond": torch.full_like(labels, net.fake_null_label),
        }
        loss, metrics = loss_fn(net, ema.model, batch, it, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        ema.update(net)
        if (it + 1) % config.log_every == 0 or it + 1 == config.iterations:
            elapsed = time.perf_counter() - start
            rate = (it + 1) / elapsed
            row = {"method": method, "iteration": it + 1, **{k: round(v.item(), 5) for k, v in metrics.items()}}
            history.append(row)
            log.info(
                "%s it %d/%d loss %.4f (data %.4f self %.4f) lambda %.3f aux %d | %.0f it/s, ETA %.0fs",
                method,
                it + 1,
                config.iterations,
                row["loss"],
                row["loss_data"],
                row["loss_self"],
                row["lambda_mean"],
                row["aux_on"],
                rate,
                (config.iterations - it - 1) / rate,
            )
    return ema.model, history


@torch.no_grad()
def sample_method(net: DualTimeMLP, method: str, labels: Tensor, steps: int, config: Toy2DConfig) -> Tensor:
    """Samples (N, 2) for the given labels, from the same noise for every method and step count."""
    gen = torch.Generator().manual_seed(config.seed + 2)
    noise = torch.randn(labels.shape[0], 2, generator=gen)
    return sample(
        net, noise, labels, torch.full_like(labels, net.null_label), config.sampler(method, steps), generator=gen
    )


def _train_in_worker(
    method: str, x_train: Tensor, y_train: Tensor, num_conditions: int, config: Toy2DConfig, threads: int
) -> tuple[dict, list[dict], float]:
    """Entry point of a training process: returns the EMA weights, the log and the seconds taken."""
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    net, history = train_method(method, x_train, y_train, num_conditions, config)
    return net.state_dict(), history, time.perf_counter() - start


def train_both(
    x_train: Tensor, y_train: Tensor, num_conditions: int, config: Toy2DConfig, jobs: int = 1
) -> dict[str, tuple[DualTimeMLP, list[dict], float]]:
    """Train every method, one after the other (jobs=1) or each in its own process (jobs=2).

    The methods are independent and the network is small, so one process per core beats two
    threads per matmul. Each method seeds itself, so both ways train the same networks (up to the
    summation order of a different thread count).
    """
    if jobs <= 1:
        out = {}
        for method in METHODS:
            start = time.perf_counter()
            net, history = train_method(method, x_train, y_train, num_conditions, config)
            out[method] = (net, history, time.perf_counter() - start)
        return out
    threads = max(1, torch.get_num_threads() // len(METHODS))
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    with ProcessPoolExecutor(max_workers=min(jobs, len(METHODS)), mp_context=context) as pool:
        futures = {
            m: pool.submit(_train_in_worker, m, x_train, y_train, num_conditions, config, threads) for m in METHODS
        }
        out = {}
        for method, future in futures.items():
            state, history, seconds = future.result()
            net = DualTimeMLP(num_conditions, config.width, config.depth)
            net.load_state_dict(state)
            out[method] = (net.eval().requires_grad_(False), history, seconds)
    return out


def run_experiment(
    config: Toy2DConfig,
    train_data: tuple[Tensor, Tensor],
    heldout: tuple[Tensor, Tensor],
    known_modes: RingMixture | None,
    jobs: int = 1,
) -> dict:
    """Train both methods, sample every step count, evaluate. Returns the results dict (also the samples)."""
    x_train, y_train = train_data
    x_ref, y_ref = heldout
    num_conditions = int(torch.cat([y_train, y_ref]).max().item()) + 1
    gen = torch.Generator().manual_seed(config.seed + 3)
    eval_labels = y_ref[torch.randint(len(y_ref), (config.eval_samples,), generator=gen)]
    results: dict = {"config": config.to_dict(), "methods": {}, "samples": {}, "eval_labels": eval_labels}
    trained = train_both(x_train, y_train, num_conditions, config, jobs)
    for method in METHODS:
        net, history, train_seconds = trained[method]
        per_steps = {}
        for steps in config.steps:
            x = sample_method(net, method, eval_labels, steps, config)
            results["samples"][(method, steps)] = x
            per_steps[steps] = evaluate_samples(x, eval_labels, x_ref, y_ref, known_modes)
        results["methods"][method] = {"train_seconds": train_seconds, "history": history, "metrics": per_steps}
    return results
