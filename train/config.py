"""The trainer's configuration: one dataclass tree, presets as functions, checked `key=value` overrides.

    config = preset("smoke")
    config = apply_overrides(config, ["optim.lr=1e-4", "model.hidden_size=128", "objective.aux_start=none"])
    save_config(config, run_dir / "config.json"); load_config(run_dir / "config.json") == config

Every section validates itself in `__post_init__`; an override re-validates the section it touches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfe.components.fp8 import FP8Config
from selfe.components.text_encoders import DTYPE_NAMES
from selfe.method.objective import ObjectiveConfig
from selfe.method.renorm import is_cfg_scale
from selfe.method.schedule import TimeShift
from selfe.network.config import MMDiTConfig, mmdit_preset
from selfe.utils.atomic import atomic_write_json

DATA_SOURCES = ("procedural", "synthetic", "cache", "images")
ENCODERS = ("smoke", "flux", "pixels")
PRECISIONS = ("auto", "bf16", "fp32")
# An override's tuple values: comma-separated, those of a tuple inside it colon-separated (deeper: none)
TUPLE_SEPARATORS = {",": ":", ":": None}
SEPARATOR_NAMES = {",": "comma", ":": "colon"}


@dataclass
class DataSection:
    """Where batches come from.

    procedural: bundled learnable data made in memory (latents a fixed function of a short caption
        encoded by the smoke text encoder); for the CPU smoke run and the tests.
    synthetic: random tensors of the right shapes (benchmarks only; nothing to learn).
    cache: a `selfe cache` folder (latents + T5/CLIP states), read with CachedDataset.
    images: a TSV manifest; batches from `cache_dir` when it holds a cache (that manifest's, fitting the
        model: any other is an error at start-up), else decoded and encoded on the fly with `encoders`:
        "flux" (the FLUX.1 autoencoder, T5, CLIP from ae_path/t5_path/clip_path; an autoencoder file
        written by selfe.components.autoencoder.save_autoencoder carries its own config), "pixels" (pixel space: the
        space-to-depth autoencoder with pixel_factor/pixel_scale, T5 and CLIP from t5_path/clip_path;
        ShapesEval) or "smoke" (SMOKE ONLY: random-init stand-ins, a pipeline check).
    With a cache and the auxiliary term on, the fake prompt is encoded online by `encoders` (the trainer
    checks their paths at start when the term switches on within the run: check_fake_prompt_encoder).
    batch_size is per rank and per micro-batch; the global batch is batch_size * world * grad_accum.
    """

    source: str = "procedural"
    cache_dir: str | None = None
    # [ours] Check each cache file's SHA-256 against the index when its first row is read (one extra read of
    # every file per process, ~0.5 s per 250 MB shard on one CPU core): a corrupted shard is named, not trained on.
    cache_verify: bool = True
    batch_size: int = 8
    resolution: int = 64  # pixels; latents are resolution / 8 with 16 channels (procedural/synthetic)
    num_samples: int = 256  # procedural data set size
    text_length: int = 16  # tokens of the procedural/synthetic text states
    # [ours] Each micro-batch's text cut (or padded) to the smallest of text_bucket, 2x, 4x, ... that holds its
    # longest caption, fake prompts included: exact (padded text is masked out as keys, at RoPE position 0),
    # fewer tokens a step for short captions at T5's 512. Each bucket is a static shape of its own to
    # torch.compile, from the bounded set selfe.train.compile_shapes documents; None keeps the source's length.
    text_bucket: int | None = None
    # [ours] Optimizer steps of batches read, decoded and copied ahead on a background thread (pinned memory
    # and a side stream on CUDA; selfe.train.prefetch); 0 reads each step's batches in the training loop.
    prefetch_steps: int = 2
    seed: int = 0
    manifest: str | None = None
    base_dir: str | None = None
    encoders: str = "flux"
    ae_path: str | None = None
    t5_path: str | None = None
    clip_path: str | None = None
    t5_max_length: int = 512  # T5 tokens per prompt (padding beyond the longest prompt is trimmed in caches)
    pixel_factor: int = 8  # encoders="pixels": space-to-depth factor (a token is factor x factor pixels at patch 1)
    pixel_scale: float = 2.0  # encoders="pixels": latents = pixel_scale * unshuffled pixels in [-1, 1]
    min_side: int = 64  # manifest images with a shorter side are skipped (counted as tiny_image)
    # The paper's progressive schedule (cache source): `resolution` only, then from iteration `high_from` each
    # batch at `high_resolution` with probability `high_fraction` (paper: 256^2, then 1:1 with 512^2 from 500k).
    high_resolution: int | None = None
    high_from: int = 500_000
    high_fraction: float = 0.5
    # (iteration, per-rank batch size) pairs, in order: from each iteration on, batch_size becomes that size
    # (the paper: global 1024 -> 768 at 500k). The data order starts a new stage there, as a resume with another
    # batch size does (selfe.train.data.sampler), and a resume either side of the change lands on the right
    # batch. For the sources whose order is resumable across batch sizes (cache, images) and synthetic.
    batch_stages: tuple[tuple[int, int], ...] = ()

    def resolution_schedule(self):
        """The cache reader's ResolutionSchedule: fixed at `resolution`, or progressive."""
        from selfe.train.data.buckets import ResolutionSchedule

        if self.high_resolution is None:
            return ResolutionSchedule.fixed(self.resolution)
        return ResolutionSchedule.progressive(self.high_from, self.resolution, self.high_resolution, self.high_fraction)

    def batch_size_at(self, iteration: int) -> int:
        """The per-rank batch size of `iteration` under batch_stages."""
        size = self.batch_size
        for start, stage_size in self.batch_stages:
            if iteration >= start:
                size = stage_size
        return size

    def __post_init__(self) -> None:
        self.batch_stages = tuple(tuple(stage) for stage in self.batch_stages)
        starts = [start for start, _ in self.batch_stages]
        if any(start < 1 for start in starts) or starts != sorted(set(starts)):
            raise ValueError(f"data.batch_stages must start at increasing iterations >= 1, got {self.batch_stages}")
        if any(size < 1 for _, size in self.batch_stages):
            raise ValueError(f"data.batch_stages sizes must be >= 1, got {self.batch_stages}")
        if self.batch_stages and self.source == "procedural":
            raise ValueError("data.batch_stages needs a source whose data order takes a new batch size (cache, images)")
        if self.encoders not in ENCODERS:
            raise ValueError(f"data.encoders must be one of {ENCODERS}, got {self.encoders!r}")
        if self.source == "images" and not self.manifest:
            raise ValueError("data.source='images' needs data.manifest (a TSV of image path and caption)")
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source == "cache" and not self.cache_dir:
            raise ValueError("data.source='cache' needs data.cache_dir (a `selfe cache` folder)")
        for name in ("batch_size", "num_samples", "text_length", "t5_max_length", "pixel_factor", "min_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefetch_steps < 0:
            raise ValueError(f"data.prefetch_steps must be >= 0, got {self.prefetch_steps}")
        if self.text_bucket is not None and self.text_bucket < 1:
            raise ValueError(f"data.text_bucket must be >= 1 or none, got {self.text_bucket}")
        if not 0 <= self.seed < 2**64:  # numpy's seed sequence takes no negative, torch's generator 64 bits
            raise ValueError(f"data.seed must lie in [0, 2**64), got {self.seed}")
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"data.resolution must be a multiple of 16 (>= 16), got {self.resolution}")
        if self.high_resolution is not None:
            if self.high_resolution <= self.resolution:
                raise ValueError(
                    f"data.high_resolution={self.high_resolution} must be above data.resolution={self.resolution} "
                    "(the progressive schedule's second stage); data.high_resolution=none trains at one resolution"
                )
            self.resolution_schedule()  # validates high_resolution / high_from / high_fraction


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear decay to `final_lr` at `decay_steps` (default: the run's end)."""

    lr: float = 3e-4
    final_lr: float = 1e-5
    warmup_steps: int = 1000
    decay_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # [ours]
    grad_clip: float | None = 1.0  # [ours]; None: no clipping (the norm is still measured)
    grad_accum: int = 1
    # AdamW's kernels: "fused" (one kernel per parameter group: about a third of foreach's memory traffic on a
    # 2B model), "foreach", or "auto" (fused on CUDA, foreach elsewhere)
    implementation: str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.implementation not in ("auto", "fused", "foreach"):
            raise ValueError(f"optim.implementation must be auto, fused or foreach, got {self.implementation!r}")
        if not self.lr > 0 or self.final_lr < 0:
            raise ValueError(f"optim.lr must be > 0 and final_lr >= 0, got {self.lr}, {self.final_lr}")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
            raise ValueError("optim.warmup_steps must be >= 0 and optim.decay_steps >= 1 (or None)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclass
class EMAConfig:
    """The EMA copy: the self-evaluation's conditional estimate g_c comes from it (selfe.method.objective).

    The paper keeps a constant decay (its presets here: warmup=False). The warm-up is ours (on by default, for
    short runs): decay_k = min(decay, (1 + k) / (10 + k)) (selfe.train.ema) makes the EMA follow the live
    network closely for the first ~10^4 steps, so early on g_c is nearly the live network's conditional
    estimate rather than an average over a long stretch of training: it changes the self-evaluated target of
    the objective, not only the exported weights."""

    decay: float = 0.9999
    warmup: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {self.decay}")


# Activation checkpointing per block, cheapest compute first: none (keep every activation), selective (keep the
# outputs of the GEMMs and attention, recompute the elementwise ops between them), full (keep a block's inputs
# only: its whole forward again in backward, about a third more compute); auto: the first of these whose
# estimated peak fits the GPU (selfe.train.memory_plan)
AC_POLICIES = ("none", "selective", "full")
AC_CHOICES = (*AC_POLICIES, "auto")
# Configs saved before the policies stored a bool: true meant full, false none
AC_LEGACY = {True: "full", False: "none", "true": "full", "false": "none"}


@dataclass
class ParallelConfig:
    """The parallelize passes, in torchtitan's order: activation checkpointing -> compile -> FSDP2."""

    activation_checkpointing: str = "none"  # AC_CHOICES; a bool (older configs) maps to full / none
    # auto: the share of the GPU's memory the estimated peak may fill (the rest: the CUDA context, NCCL's
    # buffers, the caching allocator's fragmentation, which the estimate does not see)
    memory_fraction: float = 0.85
    # FSDP2's explicit prefetch: all-gather this many blocks ahead in forward (behind in backward) while the
    # current block computes; 0 leaves FSDP2's implicit order (gathers issued when a block starts)
    prefetch_blocks: int = 1
    compile: bool = False  # torch.compile per block
    compile_fullgraph: bool = True  # a graph break in a block is an error (False: allowed, slower)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" traces without code generation)
    precision: str = "auto"  # auto: bf16 params / fp32 reduce on CUDA, fp32 on CPU
    # Free the gathered parameters after each block's forward (None: on with more than one rank; with one,
    # freeing only makes FSDP2 cast and copy the whole model again for the next pass)
    reshard_after_forward: bool | None = None
    backend: str | None = None  # process-group backend; None: nccl on CUDA, gloo on CPU

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.activation_checkpointing = AC_LEGACY.get(self.activation_checkpointing, self.activation_checkpointing)
        if self.activation_checkpointing not in AC_CHOICES:
            raise ValueError(
                f"parallel.activation_checkpointing must be one of {AC_CHOICES}, got {self.activation_checkpointing!r}"
            )
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"parallel.memory_fraction must lie in (0, 1], got {self.memory_fraction}")
        if self.prefetch_blocks < 0:
            raise ValueError(f"parallel.prefetch_blocks must be >= 0, got {self.prefetch_blocks}")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is also written at the end); 0: only at the end
    keep: int = 3  # complete checkpoints kept (oldest removed first)
    resume: bool = True  # continue from the newest complete checkpoint in run_dir/checkpoints
    # [ours] A newest checkpoint with a file that cannot be read (truncated, garbled): log it by name and resume
    # from the one before it; false: refuse to start.
    fall_back: bool = True
    # Start the live and EMA weights from an export folder or a .safetensors file instead of the random init
    # (continued training, fine-tuning); optimizer, schedule and step start fresh. A checkpoint to resume wins.
    init_from: str | None = None
    # With init_from: the run's model may have more double/single blocks than the source's (model growth).
    # The source's blocks come first in each stack; the new ones keep their adaLN-Zero init (identity).
    init_grow: bool = False
    export_at_end: bool = True  # EMA weights -> run_dir/export (model.safetensors + config.json)
    # Copy data.t5_path / clip_path into the export (text_encoder/, text_encoder_2/) so it loads on its own;
    # for small encoders (ShapesEval's), not for T5-XXL.
    export_text_encoders: bool = False
    # Copy data.ae_path into the export (ae.safetensors, its config in config.json): for a small trained
    # autoencoder (ShapesEval's), not for FLUX.1's.
    export_autoencoder: bool = False
    # A run on stand-in data (data.source procedural / synthetic, or data.encoders=smoke) has no encoders to copy:
    # write random-init tiny ones sized to the model into the export, so `selfe generate --model RUN/export`
    # samples with no --ae / --t5 / --clip (a pipeline check; selfe.train.stand_in_export). On in the smoke
    # preset; off by default, as it imports transformers. A run on real encoders has nothing to stand in for.
    export_stand_ins: bool = False
    # The export's default EP-CFG omega (config.json "sampler": "guidance"); None: sample without CFG.
    export_guidance: float | None = 5.0
    # [ours] The floating dtype export stores the weights in: float32, or float16 / bfloat16 (fp16, bf16) for a
    # file half the size (a loader casts to its own dtype). Training and its checkpoints stay fp32 either way.
    export_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.export_dtype not in DTYPE_NAMES:
            raise ValueError(
                f"checkpoint.export_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.export_dtype!r}"
            )
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint.every must be >= 0 and keep >= 1, got {self.every}, {self.keep}")
        if self.init_grow and not self.init_from:
            raise ValueError("checkpoint.init_grow grows the model of checkpoint.init_from, which is not set")
        if self.export_stand_ins and (self.export_text_encoders or self.export_autoencoder):
            raise ValueError(
                "checkpoint.export_stand_ins writes random stand-in encoders where export_text_encoders / "
                "export_autoencoder copy the run's own: set checkpoint.export_stand_ins=false"
            )
        if self.export_guidance is not None and not is_cfg_scale(self.export_guidance):  # as SamplerConfig's
            raise ValueError(
                f"checkpoint.export_guidance must be a finite number >= 0 or none, got {self.export_guidance}"
            )


@dataclass
class MetricsConfig:
    log_every: int = 10  # progress line period (JSONL gets every step)
    # per device FLOP/s for MFU; None: the GPU's dense bf16 peak (selfe.network.flops.DENSE_BF16_PEAK_FLOPS), the
    # H100's 989e12 where the GPU is not listed; on a CPU none (MFU n/a)
    peak_flops: float | None = None
    tensorboard: bool = True  # only if tensorboard is installed
    nvtx: bool = True

    def __post_init__(self) -> None:
        if self.log_every < 1 or not (self.peak_flops is None or self.peak_flops > 0):
            raise ValueError("metrics.log_every must be >= 1 and metrics.peak_flops > 0 (or None: the device's)")


@dataclass
class FaultConfig:
    max_nonfinite_streak: int = 10  # abort after this many consecutive skipped (non-finite) steps
    inject_nan_steps: tuple[int, ...] = ()  # testing: poison the batch of these steps with NaN
    kill_in_checkpoint_step: int | None = None  # testing: SIGKILL inside this step's checkpoint write

    def __post_init__(self) -> None:
        self.inject_nan_steps = tuple(self.inject_nan_steps)
        if self.max_nonfinite_streak < 1:
            raise ValueError(f"fault.max_nonfinite_streak must be >= 1, got {self.max_nonfinite_streak}")


@dataclass
class TrainConfig:
    """The whole run. `steps` counts optimizer steps (iterations, the objective's clock)."""

    name: str = "custom"
    run_dir: str = "runs/selfe"
    steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    model: MMDiTConfig = field(default_factory=lambda: mmdit_preset("tiny"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    # FP8 linears for the live network (`fp8.recipe=torchao|te`); the EMA copy, checkpoints and the export
    # stay high precision: FP8 is a run-time choice, not a file format.
    fp8: FP8Config = field(default_factory=FP8Config)

    def __post_init__(self) -> None:
        if not self.run_dir.strip():  # "" would write checkpoints and metrics into the working folder
            raise ValueError("run_dir must name a folder, got an empty string")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.objective.self_eval and self.objective.s_split == "half" and self.data.batch_size < 2:
            raise ValueError("objective.s_split='half' needs data.batch_size >= 2")

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))


def check_fake_prompt_encoder(config: TrainConfig) -> None:
    """A ValueError now when the auxiliary term switches on within the run and the text encoders of its fake
    prompt are not configured or not there. A cache stores no encoding of the fake prompt, so a cache-fed run
    loads them only when the term switches on: 550k iterations into the 2b recipe. A check of the files, so
    the trainer runs it at start, not the constructor (a preset names no encoders)."""
    data, objective = config.data, config.objective
    if not objective.aux_on(config.steps - 1) or data.source not in ("cache", "images") or data.encoders == "smoke":
        return
    why = (
        f"objective.aux_start={objective.aux_start} switches the auxiliary term on within the run "
        f"(steps={config.steps}) and its fake prompt is encoded online"
    )
    keys = ("t5_path", "clip_path")
    if missing := [f"data.{k}" for k in keys if not getattr(data, k)]:
        raise ValueError(
            f"{why}, which needs {' and '.join(missing)} (data.encoders={data.encoders!r}): set "
            f"{'them' if len(missing) > 1 else 'it'}, or objective.aux_start=none"
        )
    if absent := [f"data.{k}={getattr(data, k)!r}" for k in keys if not os.path.exists(getattr(data, k))]:
        raise ValueError(f"{why} from {' and '.join(absent)}: no such file or folder")


# ---------------------------------------------------------------------------------------------
# Presets


def smoke() -> TrainConfig:
    """CPU smoke run: tiny model, bundled procedural data at 64^2, fp32; about a minute on 2 cores."""
    return TrainConfig(
        name="smoke",
        run_dir="runs/smoke",
        steps=150,
        device="cpu",
        model=mmdit_preset("tiny"),
        objective=ObjectiveConfig(tau_warmup=100, aux_start=None, time_shift=TimeShift(mu=0.5)),
        data=DataSection(source="procedural", batch_size=8, resolution=32, num_samples=64, text_length=8),
        optim=OptimConfig(lr=2e-3, final_lr=1e-4, warmup_steps=10),
        ema=EMAConfig(decay=0.99),
        checkpoint=CheckpointConfig(every=50, keep=2, export_stand_ins=True),
        metrics=MetricsConfig(log_every=10),
    )


def paper_0_5b() -> TrainConfig:
    """The paper's ablation recipe (docs/method.md §4, §6): 0.5B at 256^2, batch 1024, 300k iterations, tau
    warm-up over all of them, Adam(0.9, 0.95), 1k warm-up, 3e-4 -> 1e-5, EMA 0.9999, no aux term.
    Per-rank batch 32 assumes 32 GPUs; set data.batch_size / optim.grad_accum for yours."""
    return TrainConfig(
        name="0.5b",
        run_dir="runs/selfe-0.5b",
        steps=300_000,
        model=mmdit_preset("0.5b"),
        objective=ObjectiveConfig(tau_warmup=300_000, aux_start=None),
        data=DataSection(source="cache", cache_dir="cache/train", batch_size=32, resolution=256),
        optim=OptimConfig(lr=3e-4, final_lr=1e-5, warmup_steps=1000),
        ema=EMAConfig(decay=0.9999, warmup=False),  # the paper's constant decay
        parallel=ParallelConfig(compile=True),
        checkpoint=CheckpointConfig(every=5000, keep=3),
    )


def paper_2b() -> TrainConfig:
    """The paper's 2B recipe: 710k iterations, tau warm-up 300k, the auxiliary term from 550k, 256^2 until
    500k, then a 1:1 mix of 256^2 and 512^2 batches (the cache must hold both resolutions). The paper also
    lowers the global batch from 1024 to 768 at 500k: data.batch_stages takes the per-rank batch from 16 to
    12 there (1024 -> 768 on 64 GPUs; scale both for yours); the data order starts a new stage at the next
    epoch and keeps counting iterations (selfe.train.data.sampler). The learning rate decays to 710k
    (optim.decay_steps), not to `steps`, so a run split into legs follows one schedule. The auxiliary term
    encodes its fake prompt with T5 and CLIP: a run past 550k needs data.t5_path and data.clip_path.
    Text is cut to buckets of 64, 128, 256 and 512 tokens (data.text_bucket [ours]): the 256^2 stage would
    otherwise run mostly padding; each bucket is a static compiled shape (selfe.train.compile_shapes)."""
    return TrainConfig(
        name="2b",
        run_dir="runs/selfe-2b",
        steps=710_000,
        model=mmdit_preset("2b"),
        objective=ObjectiveConfig(tau_warmup=300_000, aux_start=550_000),
        data=DataSection(
            source="cache",
            cache_dir="cache/train",
            batch_size=16,
            resolution=256,
            high_resolution=512,
            high_from=500_000,
            text_bucket=64,
            batch_stages=((500_000, 12),),
        ),
        optim=OptimConfig(lr=3e-4, final_lr=1e-5, warmup_steps=1000, decay_steps=710_000),
        ema=EMAConfig(decay=0.9999, warmup=False),  # the paper's constant decay
        # the cheapest policy that fits the GPU at hand (full AC costs about a third more compute)
        parallel=ParallelConfig(compile=True, activation_checkpointing="auto"),
        checkpoint=CheckpointConfig(every=2000, keep=3),
    )


# Space-to-depth factor of ShapesEval's pixel autoencoder: a token is a 4x4 RGB patch, 48 values, 64 tokens
# at 32^2. (8x8 patches, 192 values, are more than a width-128 network can carry: with velocity targets its
# samples kept the noise.)
SHAPES_PIXEL_FACTOR = 4

# Latent channels of the tiny trained autoencoder (`selfe data shapes --autoencoder trained`): 8x8x8 latents,
# 512 values per scene against the pixels' 3072, at the same 64 tokens.
SHAPES_AE_CHANNELS = 8


def shapes_model() -> MMDiTConfig:
    """ShapesEval's MMDiT: pixel space, a token per 4x4 RGB patch (space-to-depth 4, patch 1: 64 tokens at
    32^2), width 128 in 2 heads of 64, 4 double + 2 single blocks, the tiny T5 / CLIP widths."""
    return MMDiTConfig(
        name="shapes",
        hidden_size=128,
        num_heads=2,
        depth_double=4,
        depth_single=2,
        axes_dim=(8, 28, 28),
        in_channels=3 * SHAPES_PIXEL_FACTOR**2,
        patch_size=1,
        txt_dim=64,
        vec_dim=64,
        time_embed_dim=128,
    )


def shapes(self_eval: bool = True, autoencoder: str = "pixels") -> TrainConfig:
    """ShapesEval (`selfe data shapes` first): Self-E or, with self_eval=False, flow matching on the same
    model, data, iterations and seed. Sized for a CPU: 1300 iterations of 64; the pair runs side by side
    in under 30 min on 2 cores. tau rises over the first 30% (the paper: 300k of 710k), EMA 0.995 (a short
    run), no aux term, time shift mu = 1 (pixel space at 32^2 needs more noise than the token count suggests).
    autoencoder="trained" (`selfe data shapes --autoencoder trained`): the same run in the tiny trained
    autoencoder's 8x8x8 latents (still 64 image tokens), which the export carries."""
    method = "selfe" if self_eval else "fm"
    steps = 1300
    if autoencoder == "pixels":
        suffix, model = "", shapes_model()
        encoders = {"encoders": "pixels", "cache_dir": "data/shapes/cache"}
    elif autoencoder == "trained":
        suffix, model = "-ae", dataclasses.replace(shapes_model(), in_channels=SHAPES_AE_CHANNELS)
        encoders = {"encoders": "flux", "cache_dir": "data/shapes/cache-ae", "ae_path": "data/shapes/ae.safetensors"}
    else:
        raise ValueError(f"autoencoder must be 'pixels' or 'trained', got {autoencoder!r}")
    return TrainConfig(
        name=f"shapes-{method}{suffix}",
        run_dir=f"runs/shapes-{method}{suffix}",
        steps=steps,
        model=model,
        objective=ObjectiveConfig(
            self_eval=self_eval, tau_warmup=steps * 3 // 10, aux_start=None, time_shift=TimeShift(mu=1.0)
        ),
        data=DataSection(
            source="images",
            manifest="data/shapes/train.tsv",
            t5_path="data/shapes/text_encoder",
            clip_path="data/shapes/text_encoder_2",
            t5_max_length=16,
            pixel_factor=SHAPES_PIXEL_FACTOR,
            resolution=32,
            min_side=32,
            batch_size=64,
            **encoders,
        ),
        optim=OptimConfig(lr=1e-3, final_lr=1e-4, warmup_steps=100),
        ema=EMAConfig(decay=0.995),
        checkpoint=CheckpointConfig(
            every=250,
            keep=2,
            export_text_encoders=True,
            export_autoencoder=autoencoder == "trained",
            # In the latents each method samples best at its own setting (README): Self-E without CFG (its
            # self-evaluated target already carries the guidance direction), flow matching at omega 5.
            export_guidance=None if autoencoder == "trained" and self_eval else 5.0,
        ),
        metrics=MetricsConfig(log_every=50),
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "smoke": smoke,
    "0.5b": paper_0_5b,
    "2b": paper_2b,
    "shapes-selfe": lambda: shapes(self_eval=True),
    "shapes-fm": lambda: shapes(self_eval=False),
    "shapes-selfe-ae": lambda: shapes(self_eval=True, autoencoder="trained"),
    "shapes-fm-ae": lambda: shapes(self_eval=False, autoencoder="trained"),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def resolve(config: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """A preset name or a saved config.json path, then `key=value` overrides, each key at most once: a command
    line that sets one twice is refused (which value was meant?)."""
    given: dict[str, str] = {}
    for item in overrides:
        key = _split_override(item)[0]
        if key in given:
            raise ValueError(f"config key {key!r} is given twice ({given[key]!r}, then {item!r}): give it once")
        given[key] = item
    base = load_config(config) if config.endswith(".json") or os.path.isfile(config) else preset(config)
    return apply_overrides(base, overrides)


# ---------------------------------------------------------------------------------------------
# Overrides and (de)serialisation


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`section.key=value` strings applied in order; values parsed by the field's type; unknown keys
    and unparsable values are errors. A tuple's values are comma-separated (optim.betas=0.9,0.95), those of
    a pair inside it colon-separated (objective.time_shift.anchors=512:0.5,4096:1.15). Returns a new,
    validated config. A key given again replaces the earlier value (callers layer theirs on a base list);
    `resolve`, the command line's, refuses that."""
    data = config.to_dict()
    for item in overrides:
        key, raw = _split_override(item)
        path = key.split(".")
        target_type, node = _field_type(TrainConfig, path, key), data
        for part in path[:-1]:
            node = node[part]
        # A str field takes the value as given: its spaces can matter ("objective.fake_prompt_prefix=fake image, ")
        node[path[-1]] = _parse(raw if target_type is str else raw.strip(), target_type, key)
    return config_from_dict(data)


def _split_override(item: str) -> tuple[str, str]:
    """'section.key=value' -> ('section.key', 'value'); the key stripped, the value as given."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    return key.strip(), raw


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Inverse of `TrainConfig.to_dict()`; unknown keys are errors at every level."""
    return _build(TrainConfig, _upgraded(data), "")


def _upgraded(data: Any) -> Any:
    """A config dict of an older format in today's: activation_checkpointing was a bool (true: full)."""
    parallel = data.get("parallel") if isinstance(data, dict) else None
    if isinstance(parallel, dict) and isinstance(parallel.get("activation_checkpointing"), bool):
        legacy = AC_LEGACY[parallel["activation_checkpointing"]]
        return {**data, "parallel": {**parallel, "activation_checkpointing": legacy}}
    return data


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """The resolved config as JSON, written atomically."""
    atomic_write_json(path, config.to_dict())


def load_config(path: str | os.PathLike) -> TrainConfig:
    """A saved config.json; a missing file is FileNotFoundError, bad JSON or values a ValueError naming it.
    Every section must be there (save_config writes them all): a missing one is refused, not silently
    given its defaults; a field missing from a present section still takes its default."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and (missing := _missing_sections(TrainConfig, data)):
        raise ValueError(
            f"{path}: config section{'s' * (len(missing) > 1)} {', '.join(missing)} missing (a config saved by "
            f"selfe has every section); add {'them' if len(missing) > 1 else 'it'}, e.g. "
            f'"{missing[0].split(".")[-1]}": {{}} for the defaults'
        )
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def _missing_sections(cls: type, data: dict[str, Any], where: str = "") -> list[str]:
    """The sections (dataclass fields, at any depth) of `cls` that `data` lacks, as dotted names."""
    missing = []
    for name, tp in _hints(cls).items():
        sub = _dataclass_of(tp)
        if sub is None or name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        if name not in data:
            missing.append(f"{where}{name}")
        elif isinstance(data[name], dict):
            missing += _missing_sections(sub, data[name], f"{where}{name}.")
    return missing


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _field_type(cls: type, path: list[str], key: str) -> Any:
    tp: Any = cls
    for i, part in enumerate(path):
        dc = _dataclass_of(tp)
        if dc is None:
            raise ValueError(f"unknown config key {key!r}: {'.'.join(path[:i])} is not a section")
        hints = _hints(dc)
        if part not in hints or part not in {f.name for f in dataclasses.fields(dc)}:
            raise ValueError(f"unknown config key {key!r}: {dc.__name__} has no field {part!r}; known: {sorted(hints)}")
        tp = hints[part]
    if _dataclass_of(tp) is not None:
        raise ValueError(f"config key {key!r} is a section; set one of its fields ({key}.FIELD=...)")
    return tp


def _parse(raw: str, tp: Any, key: str, sep: str | None = ",") -> Any:
    """A command-line string as type `tp` (bool, int, float, str, X | None, tuple[...]). A tuple's values
    are comma-separated, those of a tuple inside it colon-separated: time_shift.anchors=512:0.5,4096:1.15."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(raw, arg, key, sep)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"config key {key!r}: cannot parse {raw!r} as {tp}: {errors}")
    if origin is tuple:
        if sep not in TUPLE_SEPARATORS:
            raise ValueError(
                f"config key {key!r} has type {tp} (tuples nested three deep), which overrides do not support"
            )
        inner = TUPLE_SEPARATORS[sep]
        items = [p for p in raw.strip("()[]").split(sep) if p.strip()]
        if args and args[-1] is Ellipsis:
            return tuple(_parse(p.strip(), args[0], key, inner) for p in items)
        if len(items) != len(args):
            raise ValueError(f"config key {key!r} needs {_tuple_syntax(tp, sep)}, got {raw!r}")
        return tuple(_parse(p.strip(), a, key, inner) for p, a in zip(items, args))
    if tp is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"config key {key!r} is a bool; got {raw!r} (use true/false)")
    if tp in (int, float):
        try:
            return tp(float(raw)) if tp is int and "e" in raw.lower() and float(raw).is_integer() else tp(raw)
        except ValueError:
            raise ValueError(f"config key {key!r} is {tp.__name__}; cannot parse {raw!r}") from None
    if tp is str:
        return raw
    raise ValueError(f"config key {key!r} has type {tp}, which overrides do not support")


def _tuple_syntax(tp: Any, sep: str) -> str:
    """How an override writes a tuple of type `tp`: "2 comma-separated values, each 2 colon-separated (x:x,x:x)"."""
    args, inner = typing.get_args(tp), TUPLE_SEPARATORS[sep]
    pairs = [typing.get_args(a) for a in args if typing.get_origin(a) is tuple]
    what = f"{len(args)} {SEPARATOR_NAMES[sep]}-separated values"
    if not pairs or inner is None:
        return what
    pattern = sep.join(inner.join("x" * len(p)) for p in pairs)
    return f"{what}, each {len(pairs[0])} {SEPARATOR_NAMES[inner]}-separated ({pattern})"


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or 'root'} must be an object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config keys in {where or 'root'} ({cls.__name__}): {unknown}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_of(hints[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = _build(sub, value, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = _checked(value, hints[name], f"{where}.{name}".lstrip("."))
    return cls(**kwargs)


def _checked(value: Any, tp: Any, key: str) -> Any:
    """`value` (from JSON or a parsed override) as field type `tp`, or a ValueError naming `key`: a
    hand-edited config.json with "lr": "abc" must fail here, not deep inside the optimizer."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (option,) = (a for a in args if a is not type(None))  # fields are X or X | None
        return _checked(value, option, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list ({_type_name(tp)}), got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_checked(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"config key {key!r} needs {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(_checked(v, a, key) for v, a in zip(value, args))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # no field means anything by inf or nan; None switches things off
            raise ValueError(f"config key {key!r} must be finite, got {value!r}")
        return float(value)
    if tp in (bool, int, str) and type(value) is tp:
        return value
    raise ValueError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value
