"""Training-step throughput and MFU of the Self-E trainer on synthetic cached latents.

Trains a preset (default 2b) at a resolution (default 512^2: 1024 image tokens + 512 text tokens) on
random tensors of the cached shapes through the real trainer (FSDP2, sharded EMA, the full objective
with its self-evaluation passes on the s < t half), one run per variant:
    eager     no compile, no activation checkpointing
    compile   torch.compile per block
    ac        full activation checkpointing per block (eager); selective: the selective policy (GEMM and
              attention outputs kept); auto: the policy the memory plan picks for this GPU and batch
    compile+ac, compile+selective, compile+auto
MFU counts every pass (main fwd+bwd, the two no-grad self-eval forwards, and with --aux the fake
fwd+bwd, whose forward also gives g_f), activation-checkpointing recomputation excluded, over the GPU's dense bf16
peak (`selfe.network.flops.device_peak_flops`: H100's where the GPU is not listed; n/a on a CPU) or --peak-flops.
MFU is on useful FLOPs (each caption at its real length, the trainer's `tflops_per_step`); the executed FLOPs
(padding included) are reported apart. The synthetic captions fill every text token, so here the two are equal.
tau is 1 from the start (tau_warmup=0) so the self-eval passes run at full size.
With --fp8 torchao|te every variant also runs with the live network's large linears in FP8
(`fp8.recipe=...`), reported against the high-precision run of the same variant (throughput ratio),
plus the relative error of one FP8 training-converted denoiser forward against the high-precision
one on the same inputs and weights (bench/fp8.py `compare_fp8`).

    python bench/train_mfu.py --preset 2b --resolution 512 --batch 8 --steps 20 --json bench/train_mfu.json
    python bench/train_mfu.py --preset 2b --variants compile+selective,compile --batch 16 --plan-batch
    python bench/train_mfu.py --preset tiny --resolution 64 --steps 3           # CPU smoke
    python bench/train_mfu.py --preset tiny --resolution 64 --steps 3 --fp8 torchao
Under torchrun every rank trains; rank 0 prints. Images/s and tokens/s are for the whole job.
Prints a line per run to stdout as it ends (each run's start to stderr); --json PATH writes every number
(written whole or not at all). A variant that runs out of GPU memory is reported as such and the next runs.
Arguments and trainer overrides are checked before anything trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

# variant -> (compile, activation checkpointing policy); "ac" is full checkpointing
AC_VARIANTS = {"": "none", "ac": "full", "selective": "selective", "auto": "auto"}
VARIANTS = {
    name: (f"parallel.compile={compiled}", f"parallel.activation_checkpointing={policy}")
    for ac, policy in AC_VARIANTS.items()
    for compiled, name in (("false", ac or "eager"), ("true", f"compile+{ac}" if ac else "compile"))
}
MODEL_PRESETS = {"tiny": "smoke", "0.5b": "0.5b", "2b": "2b"}  # --preset -> the trainer's preset
PLAN_BATCHES = (32, 24, 16, 12, 8, 6, 4, 2, 1)  # --plan-batch tries these, largest first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(MODEL_PRESETS), default="2b", help="MMDiT preset (default 2b)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default %(default)s)")
    parser.add_argument("--batch", type=int, default=None, help="per-rank micro-batch (default 8 on CUDA, 2 on CPU)")
    parser.add_argument(
        "--plan-batch",
        action="store_true",
        help=f"per variant, the largest batch of {PLAN_BATCHES} whose estimated peak fits the GPU "
        "(selfe.train.memory_plan; --batch is then the ceiling)",
    )
    parser.add_argument(
        "--plan-memory-gib",
        type=float,
        default=None,
        help="the device memory --plan-batch fits into (default: the GPU's; on a CPU none: --batch)",
    )
    parser.add_argument("--txt-tokens", type=int, default=None, help="default 512 (T5), 16 for tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    parser.add_argument(
        "--variants", default="eager,compile,ac", help=f"comma list of {list(VARIANTS)} (default %(default)s)"
    )
    parser.add_argument(
        "--aux", action="store_true", help="auxiliary fake-score term on (one more forward and backward, at B/2)"
    )
    parser.add_argument(
        "--peak-flops", type=float, default=None,
        help="per device (default: the GPU's dense bf16 peak, selfe.network.flops)",
    )
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="(default %(default)s)")
    parser.add_argument("--attention-backend", default=None, help="default: the preset's")
    parser.add_argument("--fp8", default="none", choices=("none", "torchao", "te"), help="also run FP8, compared")
    parser.add_argument("--fp8-scaling", default="tensorwise", choices=("tensorwise", "rowwise"), help="torchao only")
    parser.add_argument("--json", default=None, help="write the results here (default: stdout only)")
    parser.add_argument("overrides", nargs="*", help="extra trainer key=value overrides")
    args = parser.parse_args(argv)
    # Checked before anything trains: a bad value should cost a second, not a traceback after a variant.
    for name in ("resolution", "steps", "batch", "txt_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:  # 0 would silently mean the default for --batch / --txt-tokens
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown or 'none given'}; known: {list(VARIANTS)}")
    if args.peak_flops is not None and not (math.isfinite(args.peak_flops) and args.peak_flops > 0):
        parser.error(f"--peak-flops must be a finite number > 0, got {args.peak_flops}")
    if args.fp8 != "none":
        from selfe.utils.optional import probe, unavailable_reason

        library = {"torchao": "torchao", "te": "transformer_engine"}[args.fp8]
        if not probe(library).available:
            parser.error(f"--fp8 {args.fp8}: {unavailable_reason(library)}")
    from selfe.train.config import apply_overrides, preset

    for variant in variants:  # the configs each run will use; building one trains nothing
        for fp8 in ("none",) if args.fp8 == "none" else ("none", args.fp8):
            try:
                apply_overrides(preset(MODEL_PRESETS[args.preset]), trainer_overrides(args, variant, Path("run"), fp8))
            except ValueError as err:
                parser.error(str(err))
    if args.json is not None:
        from selfe.utils.atomic import folder_problem

        path = Path(args.json)
        problem = "is a directory" if path.is_dir() else folder_problem(path.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    return args


def trainer_overrides(args: argparse.Namespace, variant: str, run_dir: Path, fp8: str = "none") -> list[str]:
    """The trainer's key=value overrides for one run."""
    cuda = torch.cuda.is_available()
    batch = args.batch or (8 if cuda else 2)
    txt = args.txt_tokens or (16 if args.preset == "tiny" else 512)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return [
        f"run_dir={run_dir}",
        f"steps={warmup + args.steps}",
        "data.source=synthetic",
        "data.cache_dir=none",
        f"data.batch_size={batch}",
        f"data.resolution={args.resolution}",
        "data.high_resolution=none",  # one resolution timed: a preset's progressive schedule (2b) is off
        f"data.text_length={txt}",
        "objective.tau_warmup=0",
        f"objective.aux_start={0 if args.aux else 'none'}",
        "optim.warmup_steps=1",
        "checkpoint.resume=false",
        "metrics.tensorboard=false",
        f"metrics.log_every={10**9}",
        f"metrics.peak_flops={args.peak_flops}",
        f"parallel.precision={args.precision}",
        "device=auto",
        *VARIANTS[variant],
        f"fp8.recipe={fp8}",
        *([f"fp8.scaling={args.fp8_scaling}"] if fp8 != "none" else []),
        *([f"model.attention_backend={args.attention_backend}"] if args.attention_backend else []),
        *args.overrides,
    ]


def planned_batch(args: argparse.Namespace, variant: str, fp8: str) -> tuple[int, str | None]:
    """(--plan-batch: the largest batch of PLAN_BATCHES, at most --batch, whose estimated peak per rank fits
    the device memory under the variant's checkpointing policy; else --batch or the default, the policy
    line of the plan or None)."""
    from selfe.train.config import apply_overrides, preset
    from selfe.train.memory_plan import plan_activation_checkpointing

    cuda = torch.cuda.is_available()
    default = args.batch or (8 if cuda else 2)
    memory = args.plan_memory_gib * 2**30 if args.plan_memory_gib else None
    if memory is None and cuda:
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not args.plan_batch or memory is None:
        return default, None
    world = int(os.environ.get("WORLD_SIZE", 1))
    ceiling = args.batch or max(PLAN_BATCHES)
    plan = None
    for batch in (b for b in PLAN_BATCHES if b <= ceiling):
        config = apply_overrides(
            preset(MODEL_PRESETS[args.preset]),
            [*trainer_overrides(args, variant, Path("run"), fp8), f"data.batch_size={batch}"],
        )
        plan = plan_activation_checkpointing(config, int(memory), world, "cuda" if cuda else "cpu")
        if plan.est_peak_bytes <= plan.budget_bytes:
            return batch, plan.describe()[0]
    return 1, plan.describe()[0] if plan else None


def run_variant(args: argparse.Namespace, variant: str, run_dir: Path, fp8: str = "none") -> dict:
    from selfe.train.config import apply_overrides, preset
    from selfe.train.trainer import Trainer

    cuda = torch.cuda.is_available()
    batch = args.batch or (8 if cuda else 2)
    txt = args.txt_tokens or (16 if args.preset == "tiny" else 512)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    config = apply_overrides(preset(MODEL_PRESETS[args.preset]), trainer_overrides(args, variant, run_dir, fp8))
    trainer = Trainer(config)
    try:
        for _ in range(warmup + args.steps):
            trainer.train_step()
        records = trainer.log_metrics()[warmup:]  # per-step times from CUDA events, read once at the end
        rank, world = trainer.dist.rank, trainer.dist.world_size
        mem = torch.cuda.max_memory_reserved() / 1024**3 if cuda else None
    finally:
        trainer.close()
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    step_time = statistics.median(r["step_time"] for r in records)
    first = records[0]
    return {
        "variant": variant,
        "fp8": fp8,
        "rank": rank,
        "world_size": world,
        "batch_per_rank": batch,
        "image_tokens": (args.resolution // 16) ** 2,
        "text_tokens": txt,
        "step_time_s": step_time,
        "images_per_s": first["images_per_s"] * first["step_time"] / step_time,
        "tokens_per_s": first["tokens_per_s"] * first["step_time"] / step_time,
        "tflops_per_device": first["tflops_per_step"] / world / step_time,
        "mfu": first["tflops_per_step"] * 1e12 / world / step_time / args.peak_flops if args.peak_flops else None,
        "tflops_per_step": first["tflops_per_step"],
        "executed_tflops_per_step": first["executed_tflops_per_step"],
        "useful_share": first["tflops_per_step"] / first["executed_tflops_per_step"],
        "max_reserved_gib": mem,
        "loss_finite": all(r["loss"] == r["loss"] for r in records),
    }


def fp8_error(args: argparse.Namespace) -> dict:
    """Relative error of the FP8 (training-converted) denoiser's output against the high-precision one
    on the same inputs and weights, and the forward+backward time ratio of the bare network."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # bench/fp8.py imports as `bench.fp8` from the repository root
        sys.path.insert(0, root)
    from bench.fp8 import compare_fp8, denoiser_inputs
    from selfe.components.fp8 import FP8Config
    from selfe.network.config import mmdit_preset
    from selfe.network.model import MMDiT

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.float32 if args.precision == "fp32" or not cuda else torch.bfloat16
    model_config = mmdit_preset(args.preset)
    if args.attention_backend:
        model_config = dataclasses.replace(model_config, attention_backend=args.attention_backend)
    txt = args.txt_tokens or (16 if args.preset == "tiny" else 512)
    inputs = denoiser_inputs(model_config, args.batch or (8 if cuda else 2), args.resolution, txt, device, dtype)

    def factory() -> torch.nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            model = MMDiT(model_config)
        with torch.no_grad():  # init zeros the output layers; random everywhere so the output is not 0
            for param in model.parameters():
                param.normal_(0.0, 0.02)
        return model.to(dtype)

    config = FP8Config(recipe=args.fp8, scaling=args.fp8_scaling, fsdp_float8_all_gather=False)
    comparison = compare_fp8(factory, inputs, config, training=True, warmup=1, iters=3)
    return comparison.as_dict()


def main(argv: list[str] | None = None) -> int:
    from selfe.network.flops import device_peak_flops

    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]  # checked by parse_args
    if "RANK" in os.environ and not dist.is_initialized():
        # under torchrun: one process group for all variants (each Trainer joins it, none destroys it)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # no peak known for a CPU: MFU n/a there (--peak-flops gives one)
    args.peak_flops = args.peak_flops or (device_peak_flops() if torch.cuda.is_available() else None)
    results = []
    with tempfile.TemporaryDirectory(prefix="selfe-train-mfu-") as tmp:
        for variant in variants:
            for fp8 in ("none",) if args.fp8 == "none" else ("none", args.fp8):
                if not dist.is_initialized() or dist.get_rank() == 0:  # progress: a compiled 2b run takes minutes
                    print(f"# {variant} fp8={fp8}: training {args.steps} timed steps", file=sys.stderr, flush=True)
                batch, plan_line = planned_batch(args, variant, fp8)
                run_args = argparse.Namespace(**{**vars(args), "batch": batch})
                if plan_line and (not dist.is_initialized() or dist.get_rank() == 0):
                    print(f"# {variant} fp8={fp8}: batch {batch} per rank, {plan_line}", file=sys.stderr, flush=True)
                try:
                    result = run_variant(run_args, variant, Path(tmp) / f"{variant}-{fp8}", fp8)
                except torch.OutOfMemoryError as err:  # e.g. no activation checkpointing at this batch: the
                    # other variants still run
                    rank = dist.get_rank() if dist.is_initialized() else 0
                    result = {"variant": variant, "fp8": fp8, "rank": rank, "error": _oom_message(err, run_args)}
                if plan_line:
                    result["plan"] = plan_line
                if "error" in result:  # the traceback held the failed step's tensors until the except ended
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                label = variant if fp8 == "none" else f"{variant}+{fp8}"
                base = results[-1] if fp8 != "none" else {}
                if "step_time_s" in base and "step_time_s" in result:  # against the same variant, just before
                    result["speedup_vs_high_precision"] = base["step_time_s"] / result["step_time_s"]
                results.append(result)
                if result["rank"] == 0:
                    _print(label, result)
    error = fp8_error(args) if args.fp8 != "none" else None
    if error is not None and results and results[0]["rank"] == 0:
        ratios = ", ".join(
            f"{r['variant']} x{r['speedup_vs_high_precision']:.2f}" for r in results if "speedup_vs_high_precision" in r
        )
        print(f"fp8={args.fp8}/{args.fp8_scaling} training step throughput vs high precision: {ratios}")
        print(
            f"fp8={args.fp8} denoiser output relative error {error['relative_error']:.3e} "
            f"({error['converted']} linears; bare fwd+bwd x{error['speedup']:.2f})",
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    if args.json and results and results[0]["rank"] == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        payload = {"device": device, "torch": torch.__version__, "args": vars(args), "results": results}
        if error is not None:
            payload["fp8_error"] = error
        from selfe.utils.atomic import atomic_write_bytes

        # temp file then rename: an interrupted run leaves no half-written JSON
        atomic_write_bytes(args.json, json.dumps(payload, indent=1).encode())
    return 0


def _oom_message(err: torch.OutOfMemoryError, args: argparse.Namespace) -> str:
    batch = args.batch or (8 if torch.cuda.is_available() else 2)
    return f"out of memory at batch {batch} per rank ({str(err).splitlines()[0][:160]})"


def _print(label: str, result: dict) -> None:
    from selfe.train.metrics import format_mfu

    if "error" in result:
        print(f"{label:19s} {result['error']}", flush=True)
        return
    mem = f"{result['max_reserved_gib']:.1f} GiB" if result["max_reserved_gib"] is not None else "-"
    ratio = result.get("speedup_vs_high_precision")
    print(
        f"{label:19s} step {result['step_time_s'] * 1e3:8.1f} ms | {result['images_per_s']:8.2f} img/s | "
        f"{result['tokens_per_s']:10.0f} tok/s | {result['tflops_per_device']:7.2f} TFLOP/s | "
        f"MFU {format_mfu(result['mfu']):>6s} (useful; {100 * result['useful_share']:.0f}% of executed) | mem {mem}"
        + (f" | x{ratio:.2f} vs high precision" if ratio else ""),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
