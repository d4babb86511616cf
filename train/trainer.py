"""The Self-E training loop: FSDP2 model + sharded EMA, the self-evaluating objective, DCP checkpoints,
exact resume, fault handling and MFU accounting.

One optimizer step (an "iteration", the objective's clock):
    for each of grad_accum micro-batches: SelfELoss(live, EMA, batch) forward, backward; the self-eval
    passes run without grad on the s < t half (selfe.method.objective). Gradients are reduce-scattered after
    every micro-batch, as torchtitan does: they accumulate in the fp32 shards, not in unsharded bf16.
    one all-reduce of the step's scalars (losses) -> every rank agrees on them, on the device
    clip (the global grad norm, kept on the device); a non-finite loss or norm skips optimizer.step and the
    EMA update, decided on the device (fused AdamW's found_inf, a zero EMA weight)
    optimizer.step, EMA lerp in place (shard by shard), LR schedule step
No step reads the device from the host: its scalars wait on the device (selfe.train.step_window) until a log
step (metrics.log_every, a checkpoint, the last step) reads them all at once, agrees across ranks on a stop
request (SIGTERM/SIGINT) and checks the non-finite streak. (Two exceptions, each documented where it
happens: objective.s_split="bernoulli" counts its drawn samples, and foreach AdamW reads the skip flag.)
Batches come from a background thread a few steps ahead (selfe.train.prefetch, data.prefetch_steps).
The randomness of micro-batch `slot = micro * world + rank` at iteration k comes from a generator seeded
with (seed, k, slot), so 1 rank with grad_accum 2 computes exactly what 2 ranks with grad_accum 1 do,
and a resumed run draws what an uninterrupted one would.

Caption dropout: the objective's (`objective.caption_dropout`, on the encoded conditions); the data
sources hand over undropped captions, so it happens exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

from selfe.components.fp8 import fp8_autocast_context, post_optimizer_step
from selfe.method.objective import SelfELoss
from selfe.method.schedule import tau_at
from selfe.network.flops import device_peak_flops
from selfe.network.model import MMDiT
from selfe.train.banner import nominal_step_flops, startup_banner
from selfe.train.checkpoint import Checkpointer, rng_state, set_rng_state
from selfe.train.compile_shapes import allow_compiles, compile_shapes
from selfe.train.config import TrainConfig, check_fake_prompt_encoder, save_config
from selfe.train.ema import EMA
from selfe.train.initial_weights import load_initial_weights
from selfe.train.lr import build_optimizer, build_scheduler, load_schedule, step_if
from selfe.train.memory_plan import device_memory_bytes, plan_activation_checkpointing
from selfe.train.metrics import (
    MetricsLogger,
    memory_stats,
    nvtx_range,
    self_eval_samples,
    step_flops,
    text_masks_of,
)
from selfe.train.parallelize import comm_volume, parallelize, param_dtype_for, reshard_all
from selfe.train.prefetch import Prefetcher
from selfe.train.run_dir import claim_on_rank0
from selfe.train.sources import build_source, cut_batch_text
from selfe.train.step_window import StepWindow
from selfe.utils.atomic import folder_problem

log = logging.getLogger(__name__)

SCALARS = ("loss", "loss_data", "loss_self", "loss_fake", "lambda_mean", "frac_self")


# A resume cannot change the network (its implementation aside) or the data source whose position is saved.
FREE_MODEL_KEYS = ("name", "attention_backend", "kernel_backend")  # how it runs, not what it computes


def resume_problem(checkpoint: Path, config: TrainConfig) -> str | None:
    """Why `config` cannot resume `checkpoint` (from the config.json saved in it), or None."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None  # an older checkpoint without one: the load itself reports a mismatch
    now = config.to_dict()  # JSON's types, as saved (tuples as lists)
    changes = [
        f"model.{key}: {old!r} in the checkpoint, {now['model'][key]!r} now"
        for key, old in saved.get("model", {}).items()
        if key in now["model"] and key not in FREE_MODEL_KEYS and now["model"][key] != old
    ]
    old_source = saved.get("data", {}).get("source")
    if old_source is not None and old_source != config.data.source:
        changes.append(f"data.source: {old_source!r} in the checkpoint, {config.data.source!r} now")
    if not changes:
        return None
    return (
        f"cannot resume {checkpoint} with this config ({'; '.join(changes)}): pass another run_dir to start "
        "a new run, or checkpoint.init_from for its weights"
    )


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this trainer created the process group and destroys it


@dataclass
class TrainResult:
    step: int  # optimizer steps done (including skipped ones)
    skipped: int  # steps skipped for a non-finite loss or gradient
    stopped_by_signal: bool
    losses: list[float] = field(default_factory=list)  # global loss of every step this call ran
    checkpoint: Path | None = None  # the last checkpoint written


def init_distributed(config: TrainConfig) -> DistInfo:
    """Join torchrun's process group (env RANK/WORLD_SIZE) or make a world of one; pick the device."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but this torch has no CUDA device (use device=auto or cpu)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = config.parallel.backend or ("nccl" if use_cuda else "gloo")
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def _labelled(net, live: bool, enabled: bool):
    """The network as the objective calls it, inside an NVTX range named by the pass it serves."""

    def call(x, t, s, cond):
        name = "forward" if torch.is_grad_enabled() else ("self_eval/live" if live else "self_eval/ema")
        with nvtx_range(name, enabled):
            return net(x, t, s, cond)

    return call


class Trainer:
    """Builds everything from a TrainConfig; `train()` runs to `config.steps` (resuming if asked)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dist = init_distributed(config)
        self.run_lock = None  # the claim on run_dir (rank 0), held until close()
        try:
            self._build(config)
        except BaseException:
            self.close()  # a failed start (a missing input, a bad config) leaves no process group behind
            raise

    def _build(self, config: TrainConfig) -> None:
        rank, world, device = self.dist.rank, self.dist.world_size, self.dist.device
        self.run_dir = Path(config.run_dir)
        if (problem := folder_problem(self.run_dir)) is not None:
            raise ValueError(f"run_dir {config.run_dir!r}: {problem}")
        check_fake_prompt_encoder(config)  # now, not when the auxiliary term switches on
        # Before anything is written or cleaned there: a folder that is not a run, or another trainer's, is refused.
        self.run_lock = claim_on_rank0(self.run_dir, config.name, rank, world, device)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", config.checkpoint.keep, rank, world)
        self.checkpointer.clean_partial()
        latest = self.checkpointer.latest()
        if latest is not None and not config.checkpoint.resume:
            raise ValueError(
                f"run_dir {config.run_dir!r} holds an earlier run's checkpoints (the latest {latest.name}); "
                "checkpoint.resume=false would mix the two runs' checkpoints and metrics: pass another "
                f"run_dir, or delete {latest.parent}"
            )
        resume_from = latest if config.checkpoint.resume else None
        if resume_from is not None and (problem := resume_problem(resume_from, config)) is not None:
            raise ValueError(problem)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        with torch.device(device):
            model = MMDiT(config.model)
        model.validate_inputs = False  # t, s come from the objective; the checks would sync every pass
        if config.checkpoint.init_from and resume_from is None:  # before the EMA copy: both start from it
            load_initial_weights(model, config.checkpoint.init_from, config.model, config.checkpoint.init_grow)
        self.ema = EMA(model, config.ema.decay, config.ema.warmup)  # copied before sharding: sharded alike
        mesh = init_device_mesh(device.type, (world,))
        # The activation checkpointing policy (auto: the cheapest whose estimated peak fits this GPU) and the
        # per-step communication, for the start-up banner
        self.plan = plan_activation_checkpointing(
            config, device_memory_bytes(device), world, device.type, estimate_fixed=device.type == "cuda"
        )
        self.comm = comm_volume(model, config, world)
        if rank == 0:
            for line in [*self.plan.describe(), self.comm.describe()]:
                log.info("%s", line)
        parallel = replace(config.parallel, activation_checkpointing=self.plan.policy)
        # FP8 (if any) converts the live network only, inside parallelize before AC/compile/FSDP2; the EMA
        # copy was taken above, so it stays high precision (Float8Linear keeps an ordinary weight: the lerp
        # below sees the same parameters, in the same order).
        self.model = parallelize(model, parallel, mesh, fp8=config.fp8)
        if config.parallel.compile:
            allow_compiles(compile_shapes(config, self.plan.policy))
        parallelize(self.ema.model, parallel, mesh, trainable=False)
        self.optimizer = build_optimizer(self.model.parameters(), config.optim, device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        self.loss_fn = SelfELoss(config.objective)
        self.source_batch = config.data.batch_size_at(0)
        self.source = self._build_source(self.source_batch, 0)
        self.metrics = MetricsLogger(
            self.run_dir,
            config.steps,
            config.metrics.log_every,
            config.metrics.peak_flops or (device_peak_flops(device) if device.type == "cuda" else None),
            world,
            enabled=rank == 0,
            tensorboard=config.metrics.tensorboard,
        )
        self.step = 0
        self.skipped = 0  # as of the last log step (the device counts in between: self._window)
        self.streak = 0
        self._window: StepWindow | None = None
        self._stop = False
        self.before_commit = None  # a hook inside the checkpoint write, after the data, before the rename
        if config.fault.kill_in_checkpoint_step is not None:
            self.before_commit = self._kill_in_checkpoint
        self._resumed_step = -1
        if resume_from is not None:
            self.resume()
            self._resumed_step = self.step
        # The steps after the checkpoint run again; with none, all of them (a run killed before its first).
        self.metrics.drop_after(self.step)
        if rank == 0:  # only now: a refused resume leaves the run's config.json as its checkpoints have it
            save_config(config, self.run_dir / "config.json")

    def _build_source(self, batch_size: int, start: int) -> Prefetcher:
        """The batch source at `batch_size` from iteration `start`, read ahead up to the end of its batch
        stage (data.batch_stages) or of the run, so no batch of the next stage is read at this one's size."""
        cfg, info = self.config, self.dist
        data = replace(cfg.data, batch_size=batch_size)
        source = build_source(
            data, cfg.model, info.rank, info.world_size, cfg.optim.grad_accum, info.device,
            cfg.objective.fake_prompt_prefix,
        )  # fmt: skip
        stage_end = min([it for it, _ in cfg.data.batch_stages if it > start] + [cfg.steps])
        return Prefetcher(
            source,
            info.device,
            cfg.objective.aux_on,
            lambda batch: cut_batch_text(batch, cfg.data.text_bucket),
            cfg.data.prefetch_steps,
            stop_at=stage_end,
        )

    def _fit_source_to(self, iteration: int, state: dict[str, Any] | None = None) -> None:
        """data.batch_stages: the source at `iteration`'s batch size, continuing from `state` (a checkpoint's)
        or from where the current source stands (the data order then starts a new stage)."""
        size = self.config.data.batch_size_at(iteration)
        if size != self.source_batch or state is not None:
            state = self.source.state_dict() if state is None else state
            self.source.close()
            self.source, self.source_batch = self._build_source(size, iteration), size
        if state is not None:
            self.source.load_state_dict(state)

    # ------------------------------------------------------------------------------------------
    # Checkpoint state

    def _state(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model),
            "ema": get_model_state_dict(self.ema.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "train": {
                "step": self.step,
                "skipped": self.skipped,
                "streak": self.streak,
                "ema_updates": int(self.ema.num_updates),
                "scheduler": self.scheduler.state_dict(),
            },
        }

    def save(self) -> Path:
        with nvtx_range("checkpoint", self.config.metrics.nvtx):
            rank_state = {"rng": rng_state(), "data": self.source.state_dict()}
            return self.checkpointer.save(
                self.step, self._state(), rank_state, self.config.to_dict(), self.before_commit
            )

    def _kill_in_checkpoint(self) -> None:
        if self.step == self.config.fault.kill_in_checkpoint_step:
            os.kill(os.getpid(), signal.SIGKILL)  # testing: a kill -9 in the middle of a write

    def resume(self) -> None:
        """Load the newest complete checkpoint that reads (Checkpointer.load_newest: a damaged one is logged
        and the one before it used, unless checkpoint.fall_back=false)."""
        path, state, rank_state = self.checkpointer.load_newest(self._state, self.config.checkpoint.fall_back)
        set_model_state_dict(self.model, state["model"])
        set_model_state_dict(self.ema.model, state["ema"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        train = state["train"]
        self.step, self.skipped, self.streak = int(train["step"]), int(train["skipped"]), int(train["streak"])
        self.ema.num_updates = int(train["ema_updates"])
        load_schedule(self.scheduler, train["scheduler"])
        set_rng_state(rank_state["rng"])
        self._fit_source_to(self.step, rank_state["data"])
        if self.dist.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------
    # One step

    def _generator(self, iteration: int, slot: int) -> torch.Generator:
        seed = (self.config.seed * 1_000_003 + iteration) * 4099 + slot
        return torch.Generator(self.dist.device).manual_seed(seed % (2**63))

    def train_step(self) -> None:
        """Run iteration `self.step` without a host sync; its metrics wait on the device for `log_metrics`."""
        cfg, device = self.config, self.dist.device
        iteration, world, accum = self.step, self.dist.world_size, cfg.optim.grad_accum
        nvtx = cfg.metrics.nvtx
        aux_on = cfg.objective.aux_on(iteration)
        window = self._step_window()
        window.timer.start()
        self._fit_source_to(iteration)
        micro_batches = self.source.next_step(iteration)
        if iteration in cfg.fault.inject_nan_steps:
            micro_batches[0] = {**micro_batches[0], "x0": micro_batches[0]["x0"] * float("nan")}
        net = _labelled(self.model, True, nvtx)
        ema_net = _labelled(self.ema.model, False, nvtx)
        sums = torch.zeros(len(SCALARS), dtype=torch.float64, device=device)
        flops, useful_flops = 0, 0  # executed (padding included) and useful (real text), see metrics
        for micro, batch in enumerate(micro_batches):
            generator = self._generator(iteration, micro * world + self.dist.rank)
            # TE's fp8 autocast around the forward passes only (TE's rule; backward reuses their recipe).
            with fp8_autocast_context(cfg.fp8):
                loss, parts = self.loss_fn(net, ema_net, batch, iteration, generator)
            with nvtx_range("backward", nvtx):
                (loss / accum).backward()
            sums += torch.stack([parts[k].detach().double().to(device) for k in SCALARS])
            b, _, h, w = batch["x0"].shape
            p = cfg.model.patch_size
            img_tokens, txt_tokens = (h // p) * (w // p), batch["cond"]["txt"].shape[1]
            # the half split needs no host sync; the Bernoulli one counts the drawn samples
            frac = float(parts["frac_self"]) if cfg.objective.s_split != "half" else None
            n_self = self_eval_samples(b, cfg.objective.s_split, cfg.objective.self_eval, frac)
            counted = step_flops(cfg.model, b, img_tokens, txt_tokens, n_self, aux_on, text_masks_of(batch))
            flops, useful_flops = flops + counted["total"], useful_flops + counted["useful"]

        with nvtx_range("optimizer", nvtx):
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
            params = list(self.model.parameters())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False, foreach=True)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            dist.all_reduce(sums)  # every rank gets the same losses, so makes the same skip decision
            means = sums / (world * accum)
            finite = torch.isfinite(means[0]) & torch.isfinite(grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            step_if(self.optimizer, finite)
            post_optimizer_step(self.model, cfg.fp8)  # FP8 all-gather: next step's weight scales at once
            reshard_all(self.ema.model)
            reshard_all(self.model)
            self.ema.update(self.model, finite)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        window.timer.stop()
        self.step += 1
        global_batch = self.source_batch * world * accum
        host = dict(
            lr=lr,
            tau=tau_at(iteration, cfg.objective.tau_warmup),
            aux_on=aux_on,
            images=global_batch,
            tokens=global_batch * img_tokens,
            flops=flops * world,
        )
        # the useful count is a device tensor (from the masks): read with the rest at the log step
        window.add(self.step, means, grad_norm, finite, host, {"useful_flops": useful_flops * world})

    def _step_window(self) -> StepWindow:
        if self._window is None:  # after a resume: its counters from the checkpoint, copied once
            self._window = StepWindow(self.dist.device, SCALARS)
            self._window.set_counters(self.skipped, self.streak)
        return self._window

    def log_metrics(self) -> list[dict[str, Any]]:
        """The records of the steps since the last call, read from the device at once (the log step's sync),
        written to the metrics log; every rank learns of any rank's stop request here. Raises
        NonFiniteLossError when the non-finite streak reached fault.max_nonfinite_streak among them."""
        window, device = self._step_window(), self.dist.device
        stop = torch.full((), float(self._stop), dtype=torch.float64, device=device)
        dist.all_reduce(stop)
        rows, stop_requested = window.read(stop)
        self._stop = self._stop or stop_requested > 0
        memory = memory_stats(device)
        records = []
        for row in rows:
            record: dict[str, Any] = {k: row[k] for k in SCALARS}
            record.update(
                grad_norm=row["grad_norm"],
                lr=row["lr"],
                tau=row["tau"],
                aux_on=row["aux_on"],
                skipped=bool(row["skipped"]),
                skipped_total=int(row["skipped_total"]),
                step_time=row["step_time"],
                **self.metrics.throughput(row["step_time"], row["images"], row["tokens"], row["useful_flops"]),
                tflops_per_step=row["useful_flops"] / 1e12,  # this rank's count for every rank (see metrics)
                executed_tflops_per_step=row["flops"] / 1e12,
                **memory,
            )
            self.metrics.log(row["step"], record)
            records.append(record)
        if rows:
            self.skipped, self.streak = int(rows[-1]["skipped_total"]), int(rows[-1]["streak"])
        for row in rows:
            if row["streak"] >= self.config.fault.max_nonfinite_streak:
                raise NonFiniteLossError(
                    f"{int(row['streak'])} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{row['step']}, loss {row['loss']}, grad norm {row['grad_norm']}); aborting. "
                    "Lower optim.lr, check the data, or raise fault.max_nonfinite_streak."
                )
        return records

    def banner(self) -> str:
        """The start-up summary (rank 0 prints it), with the activation-checkpointing plan and its memory
        estimate where one was computed (selfe.train.memory_plan)."""
        cfg, device = self.config, self.dist.device
        inner = self.source.source
        return startup_banner(
            cfg,
            parameters=sum(p.numel() for p in self.model.parameters()),
            world_size=self.dist.world_size,
            device=device,
            param_dtype=param_dtype_for(cfg.parallel, device),
            peak_flops=self.metrics.peak_flops,
            flops_per_step=nominal_step_flops(cfg, self.dist.world_size, self.step),
            data_size=getattr(inner, "num_samples", None),
            compile_graphs=compile_shapes(cfg, self.plan.policy).graphs_per_code if cfg.parallel.compile else None,
            activation_checkpointing=self.plan.policy,
            estimated_peak_bytes=self.plan.est_peak_bytes,
            communication=self.comm.describe() if self.dist.world_size > 1 else None,
        )

    # ------------------------------------------------------------------------------------------
    # The loop

    def _on_signal(self, signum, frame) -> None:
        self._stop = True
        if self.dist.rank == 0:
            log.warning("signal %d: finishing the step, then checkpoint and exit", signum)

    def train(self) -> TrainResult:
        cfg = self.config
        result = TrainResult(step=self.step, skipped=self.skipped, stopped_by_signal=False)
        previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        saved_at = self._resumed_step  # a run resumed at its last step has nothing new to save
        if self.dist.rank == 0:
            print(self.banner(), file=sys.stderr, flush=True)
        try:
            while self.step < cfg.steps:
                self.train_step()
                checkpoint_due = bool(cfg.checkpoint.every) and self.step % cfg.checkpoint.every == 0
                if checkpoint_due or self.step % cfg.metrics.log_every == 0 or self.step == cfg.steps:
                    result.losses += [record["loss"] for record in self.log_metrics()]
                    if self._stop:
                        result.checkpoint, saved_at = self.save(), self.step
                        result.stopped_by_signal = True
                        break
                if checkpoint_due:
                    result.checkpoint, saved_at = self.save(), self.step
            if not result.stopped_by_signal:
                if saved_at != self.step:
                    result.checkpoint = self.save()
                if cfg.checkpoint.export_at_end:
                    from selfe.train.export import export_ema

                    export_ema(self.ema.model, cfg, self.run_dir / "export", self.dist.rank)
            if self.dist.world_size > 1:
                # Rank 0 alone writes the export: meet before any rank tears gloo/NCCL down (a rank that did
                # so while its peer was still busy once aborted at exit in CI). Only on the clean path: a
                # rank that raised must exit so torchrun stops the others, not wait here.
                dist.barrier()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics.close()
        result.step, result.skipped = self.step, self.skipped
        return result

    def close(self) -> None:
        """Stop the prefetch thread, release run_dir, and destroy the process group if this trainer made it."""
        if getattr(self, "source", None) is not None:
            self.source.close()
        if self.run_lock is not None:
            self.run_lock.release()
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()
