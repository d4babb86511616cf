"""Every GPU check of the open issues as one prepared run, sized to a short device lease.

A lent GPU comes with minutes (15 in all, start-up included), so the checks run as one command per
profile, in priority order, each step capped, the whole run ending inside its budget:

    python3 bench/device_session.py --profile engine --out "$OUT" --budget 540   # kernels, sampling, training
    python3 bench/device_session.py --profile shapes --out "$OUT" --budget 540   # the ShapesEval pair on the GPU
    python3 bench/device_session.py --profile sampling --out "$OUT" --budget 540 # end to end, baseline, FP8
    python3 bench/device_session.py --profile training --out "$OUT" --budget 540 # the training step (issue 30)
    python3 bench/device_session.py --profile training --out "$OUT" --budget 540 # the training step (issue 30)
    python3 bench/device_session.py --profile engine --plan                      # the steps and their caps
    python3 bench/device_session.py --profile shapes --dry-run --out /tmp/dry    # CPU: same steps, tiny sizes

Without --dry-run it needs an NVIDIA GPU and refuses to start without one (it would install this package
into the running Python and run the 2b checks on the CPU).

Profiles (the issue each step serves in brackets):
    engine  env, install (with the CUDA extension), GPU tests of kernels and engine [3, 6], sampling at
            batch 1 [6] and its baseline (the defaults before the H200 kernel table) [6], training MFU [5],
            ours beside diffusers' FLUX [34], sampling at batch 16 [6], the fused-op benchmark [3], model
            fwd+bwd [2], the autoencoder [4], the kernels' fp32/fp16 tests on the GPU [3]
    sampling  env, install (pure Python), torchao from the carried wheel, then [29]: sampling end to end at
            batch 1 and 1/2/4/8 steps (fast path, new defaults) with its stages and kernel profile, the same at
            2 steps with the old defaults (the baseline), FP8 against bf16 (bench/fp8_sampling.py: quality over
            fixed seeds with bounds that fail the step, then speed at batch 1 and 16), end to end at batch 16,
            eager and compiled at batch 1. The device has no torchao: in the repo root, once,
            `python3 -m pip download --no-deps --only-binary=:all:
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl torchao==0.17.0`,
            then name `.whl` in the device call's carry (3 MB)
    shapes  env, install, `selfe data shapes --autoencoder trained`, the flow matching / Self-E pair
            (`shapes-fm-ae` / `shapes-selfe-ae`) trained side by side for as many iterations as the budget
            holds (measured first), `selfe eval shapes` of both at their exports' sampler defaults [8]
    training env, install, the GPU tests of tests/train, the 2b training step at 512^2 compiled (selective
            checkpointing, none), FP8 (torchao) against bf16, the eager baseline last [30]

`--only a,b` runs those steps (with env and install): the second call of a lease, for what the first did
not reach. A failed or timed-out step is recorded and the next one runs; the CUDA install falls back to
pure Python. The device returns at most 8 files: OUT/session.log, OUT/results.json, OUT/results.md (see
bench/device_runner.py) and, for shapes, a .tar.gz per exported model and one of the evaluation (JSON, grids).
Scratch space: SELFE_DEVICE_WORK (default /tmp/selfe-device). SELFE_COMMIT names the commit when the tree
travelled without .git.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench.device_runner when run as a script

from bench.device_runner import (  # noqa: E402
    MIN_BUDGET_S,
    Session,
    Step,
    run_session,
    start,
    wait_status,
    write_atomic,
)


def probe_env(path: Path) -> None:
    """Versions and the device, written to path (run as a subprocess: this script must not need torch)."""
    import platform
    import subprocess

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # SDPA tries its kernels in this order (private; torch 2.11: flash, efficient, math, cuDNN): whether the
    # attention backend sdpa_cudnn changes anything over sdpa
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: [])()
    info["sdpa_order"] = [torch._C._SDPBackend(int(b)).name for b in order]
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30))
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
        try:
            info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = repr(err)
    else:
        info["device"] = "cpu"
    write_atomic(path, json.dumps(info))
    print(json.dumps(info))


def env_step() -> Step:
    return Step("env", "all", 60, argv=["{py}", "bench/device_session.py", "--probe-env", "{work}/env.json"],
                json="env.json")  # fmt: skip


INSTALL = ["{py}", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "-e", "."]


def install_step(cuda: bool = True) -> Step:
    """The package (the device has every dependency and no network: --no-deps, --no-index), with its CUDA
    extension when `cuda`, falling back to pure Python so the Triton and PyTorch checks still run."""
    pure = Step("install-pure", "all", 120, argv=INSTALL, env={"SELFE_BUILD_CUDA": "0"}, dry_skip=True)
    if not cuda:
        return dataclasses.replace(pure, name="install")
    jobs = str(max(1, min(16, os.cpu_count() or 1)))
    return Step("install", "all", 300, argv=INSTALL, env={"MAX_JOBS": jobs}, fallback=pure, dry_skip=True)


def py(*args: str) -> list[str]:
    return ["{py}", *args]


PEER_WHEELS = ".whl"  # diffusers (+ importlib_metadata, lazy-importer) as wheels: the device has no network


def with_peer_wheels() -> list[str]:
    """A shell prefix for a step's argv: where diffusers is missing, install the wheels carried in PEER_WHEELS
    (`carry: [".whl"]`, fetched with `pip download --no-deps`, bench/peers.py) into {work}/peer-site and put it
    on PYTHONPATH; then the rest of argv runs (`"$@"`)."""
    site = "{work}/peer-site"
    install = f"{{py}} -m pip install -q --no-index --no-deps --target {site} {PEER_WHEELS}/*.whl"
    script = f'{{py}} -c "import diffusers" 2>/dev/null || {{ {install} && export PYTHONPATH={site}; }}; exec "$@"'
    return ["bash", "-c", script, "peers"]


def engine_steps() -> list[Step]:
    """The issues' shapes (2b preset at 512^2: 1024 image + 512 text tokens); the dry run is each script's
    own CPU smoke. Caps add up past the budget on purpose: the order is the priority."""
    pytest = py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--durations=15",
                "--junitxml", "{work}/gpu_tests.xml")  # fmt: skip
    sample = py("bench/sample_throughput.py", "--preset", "2b", "--resolution", "512")
    peers = py("bench/peers.py", "--preset", "2b", "--resolution", "512")
    dry_sample = py("bench/sample_throughput.py", "--preset", "tiny", "--resolution", "64", "--steps", "1", "2",
                    "--variants", "eager", "--iters", "1")  # fmt: skip
    return [
        env_step(),
        install_step(),
        Step(
            # tests/engine first (two tests, one of them the CUDA graph); a hung test must not take the lease;
            # each new attention shape autotunes, so the tests try two configs a list, not all
            "gpu-tests", "3, 6", 210,
            argv=[*pytest, "--timeout=90", "tests/engine", "tests/kernels", "tests/bench/test_kernels_timing.py"],
            dry_argv=[*pytest, "tests/kernels/test_renorm.py"],
            junit="gpu_tests.xml",
            env={"SELFE_TRITON_AUTOTUNE": "quick"},
        ),
        Step(  # batch 1: the latency goals (2 steps), every step count, all three variants, and where a step's
            # time goes in each (what to tune next)
            "sample-b1", "6", 180,
            argv=[*sample, "--batch", "1", "--iters", "3", "--profile-kernels", "15",
                  "--json", "{work}/sample_b1.json"],
            dry_argv=[*dry_sample, "--batch", "1", "--profile-kernels", "5", "--json", "{work}/sample_b1.json"],
            json="sample_b1.json",
        ),
        Step(  # the same at 2 steps with the defaults before the H200 kernel table (SDPA's own order, torch
            # kernels, all 512 text tokens, the step compiled whole): the new defaults' gain, in speed and in
            # warm-up, as a ratio of two rows measured in one lease
            "sample-b1-baseline", "6", 120,  # a fresh process: the model, T5-XXL and a whole-step compile (46 s)
            argv=[*sample, "--batch", "1", "--steps", "1", "2", "--variants", "compiled+graph", "--iters", "3",
                  "--attention-backend", "sdpa", "--kernel-backend", "torch", "--text-bucket", "none",
                  "--compile-regions", "off", "--json", "{work}/sample_b1_base.json"],
            dry_argv=[*dry_sample, "--batch", "1", "--attention-backend", "sdpa", "--kernel-backend", "torch",
                      "--text-bucket", "none", "--compile-regions", "off", "--json", "{work}/sample_b1_base.json"],
            json="sample_b1_base.json",
        ),
        Step(
            "train-mfu", "5", 180,
            argv=py("bench/train_mfu.py", "--preset", "2b", "--resolution", "512", "--batch", "8", "--steps", "10",
                    "--variants", "eager,compile,ac,compile+ac", "--json", "{work}/train_mfu.json"),
            dry_argv=py("bench/train_mfu.py", "--preset", "tiny", "--resolution", "64", "--steps", "2",
                        "--variants", "eager", "--json", "{work}/train_mfu.json"),
            json="train_mfu.json",
        ),
        Step(  # ours beside diffusers' FLUX at the 2b sizes, after the headline numbers: sampling at batch 1, 2 steps
            # (the peer eager, compiled whole and regionally) and the fwd+bwd step at batch 4 (torchtitan's way)
            "peers", "34", 420,
            argv=[*with_peer_wheels(), *peers, "--batch", "1", "--steps", "2", "--train-batch", "4",
                  "--json", "{work}/peers.json"],
            dry_argv=[*with_peer_wheels(), *py("bench/peers.py", "--preset", "tiny", "--resolution", "32",
                      "--txt-tokens", "8", "--variants", "eager", "--iters", "1", "--train-compile", "off",
                      "--train-steps", "1", "--train-warmup", "0", "--json", "{work}/peers.json")],
            json="peers.json",
        ),
        Step(  # batch 16: the MFU goal; 50 steps here would take most of the lease (~0.3 s a step)
            "sample-b16", "6", 150,
            argv=[*sample, "--batch", "16", "--steps", "1", "2", "4", "8", "--variants", "eager", "compiled+graph",
                  "--iters", "2", "--json", "{work}/sample_b16.json"],
            dry_argv=[*dry_sample, "--batch", "2", "--json", "{work}/sample_b16.json"],
            json="sample_b16.json",
        ),
        Step(
            "kernels", "3", 150,
            argv=py("bench/kernels.py", "--json", "{work}/kernels.json"),
            dry_argv=py("bench/kernels.py", "--cpu-smoke", "--only", "energy", "--no-attention",
                        "--json", "{work}/kernels.json"),
            json="kernels.json",
        ),
        Step(
            "model-fwd-bwd", "2", 60,
            argv=py("bench/model_fwd_bwd.py", "--preset", "2b", "--resolution", "512", "--txt-tokens", "512",
                    "--batch", "4", "--profile-kernels", "20", "--json", "{work}/model_2b.json"),
            dry_argv=py("bench/model_fwd_bwd.py", "--preset", "tiny", "--resolution", "64", "--txt-tokens", "16",
                        "--batch", "2", "--iters", "1", "--profile-kernels", "5", "--json", "{work}/model_2b.json"),
            json="model_2b.json",
        ),
        Step(
            "autoencoder", "4", 60,
            argv=py("bench/autoencoder.py", "--config", "flux1", "--resolution", "512", "--batch", "8",
                    "--json", "{work}/ae.json"),
            dry_argv=py("bench/autoencoder.py", "--config", "tiny", "--resolution", "64", "--batch", "2",
                        "--iters", "1", "--json", "{work}/ae.json"),
            json="ae.json",
        ),
        Step(  # the kernels' fp32 / fp16 tests compiled for the GPU (the CPU runs them in the interpreter)
            "gpu-tests-fp32-fp16", "3", 150,
            argv=[*py("-m", "pytest", "-m", "not gpu", "-q", "-p", "no:cacheprovider", "--durations=10",
                      "--junitxml", "{work}/gpu_tests_fp.xml", "--timeout=90", "tests/kernels",
                      "--ignore=tests/kernels/test_triton_sm90_compile.py",
                      "--ignore=tests/kernels/test_csrc_compile.py")],
            dry_argv=[*py("-m", "pytest", "-m", "not gpu", "-q", "-p", "no:cacheprovider",
                          "--junitxml", "{work}/gpu_tests_fp.xml", "tests/kernels/test_renorm.py")],
            junit="gpu_tests_fp.xml",
            env={"SELFE_TRITON_AUTOTUNE": "quick"},
        ),
        Step(  # the 2b model's compile with each block a nested region and whole, fresh caches each
            "compile-time", "6", 150,
            argv=py("bench/compile_time.py", "--preset", "2b", "--resolution", "512", "--batch", "2",
                    "--json", "{work}/compile_time.json"),
            dry_argv=py("bench/compile_time.py", "--preset", "tiny", "--depth", "2", "2", "--resolution", "32",
                        "--backend", "aot_eager", "--iters", "1", "--json", "{work}/compile_time.json"),
            json="compile_time.json",
        ),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ sampling

# torchao for the FP8 step: the device has none and no network, so the wheel travels with the tree (a folder
# that .gitignore ignores, named in the device call's `carry`). 0.17.0 is built against torch 2.11.
TORCHAO_WHEEL = "torchao==0.17.0"


def torchao_step(issue: str) -> Step:
    """torchao from the wheel carried in `.whl` (the device has none and no network)."""
    return Step(
        "torchao", issue, 60,
        argv=py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", "--find-links", ".whl",
                TORCHAO_WHEEL),
        dry_skip=True,  # the CPU has its own
    )  # fmt: skip


def sampling_steps() -> list[Step]:
    """Issue 29: the end-to-end latency at batch 1 (2b at 512², EP-CFG omega 5, the bench's short prompt) with
    its stages and kernel profile, the old defaults as the baseline in the same run, FP8 against bf16 with its
    quality bounded; then the rest. Caps add up past the budget on purpose: the order is the priority."""
    sample = py("bench/sample_throughput.py", "--preset", "2b", "--resolution", "512")
    dry_sample = py("bench/sample_throughput.py", "--preset", "tiny", "--resolution", "64", "--steps", "1", "2",
                    "--variants", "eager", "--iters", "1")  # fmt: skip
    old_defaults = ["--attention-backend", "sdpa", "--kernel-backend", "torch", "--text-bucket", "none",
                    "--compile-regions", "off"]  # fmt: skip
    fp8 = py("bench/fp8_sampling.py", "--json", "{work}/fp8_sampling.json")
    return [
        env_step(),
        install_step(cuda=False),  # sampling runs the Triton forwards (kernel_backend auto): no CUDA C++ needed
        torchao_step("29"),
        Step(  # the fast path with the new defaults: the targets (2 steps <= 35 ms, 4 <= 55, 8 <= 95, end to end)
            "sample-b1-e2e", "29", 150,
            argv=[*sample, "--batch", "1", "--steps", "1", "2", "4", "8", "--variants", "compiled+graph",
                  "--iters", "5", "--profile-kernels", "15", "--json", "{work}/sample_b1_e2e.json"],
            dry_argv=[*dry_sample, "--batch", "1", "--profile-kernels", "5", "--json", "{work}/sample_b1_e2e.json"],
            json="sample_b1_e2e.json",
        ),
        Step(  # the baseline in the same lease: 2 steps with the defaults before the H200 kernel table and the
            # text bucket (a fresh process: the model, T5-XXL and a whole-step compile, 46 s)
            "sample-b1-base", "29", 120,
            argv=[*sample, "--batch", "1", "--steps", "2", "--variants", "compiled+graph", "--iters", "5",
                  *old_defaults, "--json", "{work}/sample_b1_e2e_base.json"],
            dry_argv=[*dry_sample, "--batch", "1", *old_defaults, "--json", "{work}/sample_b1_e2e_base.json"],
            json="sample_b1_e2e_base.json",
        ),
        Step(  # quality over fixed seeds first (a crossed bound fails the step), then the speed at batch 1 and 16
            "fp8", "29", 240,
            argv=[*fp8, "--preset", "2b", "--resolution", "512", "--batch", "1", "16", "--seeds", "4", "--iters", "3"],
            dry_argv=[*fp8, "--preset", "tiny", "--resolution", "32", "--batch", "1", "2", "--seeds", "1", "--iters",
                      "1", "--txt-tokens", "16"],
            json="fp8_sampling.json",
        ),
        Step(  # the rest: the MFU goal's batch (useful FLOPs), end to end
            "sample-b16-e2e", "29", 150,
            argv=[*sample, "--batch", "16", "--steps", "1", "2", "4", "8", "--variants", "compiled+graph",
                  "--iters", "2", "--json", "{work}/sample_b16_e2e.json"],
            dry_argv=[*dry_sample, "--batch", "2", "--json", "{work}/sample_b16_e2e.json"],
            json="sample_b16_e2e.json",
        ),
        Step(  # eager and compiled without the graph at batch 1: the graph's gain, and a profile of each
            "sample-b1-variants", "29", 150,
            argv=[*sample, "--batch", "1", "--steps", "2", "--variants", "eager", "compiled", "--iters", "3",
                  "--profile-kernels", "15", "--json", "{work}/sample_b1_variants.json"],
            dry_argv=[*dry_sample, "--batch", "1", "--json", "{work}/sample_b1_variants.json"],
            json="sample_b1_variants.json",
        ),
        Step(  # the pipeline's stage timings by CUDA events (no sync on the way) and the CUDA-graph pipeline
            "gpu-tests", "29", 120,
            argv=py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--timeout=90", "--junitxml",
                    "{work}/gpu_tests.xml", "tests/engine/test_stage_timings.py", "tests/engine/test_pipeline.py"),
            dry_argv=py("-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "{work}/gpu_tests.xml",
                        "tests/engine/test_stage_timings.py"),
            junit="gpu_tests.xml",
        ),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ training


def training_steps() -> list[Step]:
    """Issue 30's numbers first: after the install and a short GPU test, the 2b training step at 512^2
    compiled (selective checkpointing, then none: the plan's cheap candidates), each at the largest batch
    its memory plan fits on the GPU at hand, then FP8 (torchao, FP8
    all-gather) against bf16 on the compiled selective variant, and the eager baseline only if time is left.
    FP8 needs torchao on the device: carry its wheel in `.whl` (see the sampling profile); without it the
    torchao step fails at once and the FP8 step after it too, and the next one runs."""
    # the batch per variant: the largest the memory plan fits on this GPU (at most 16, the 2b preset's)
    mfu = py("bench/train_mfu.py", "--preset", "2b", "--resolution", "512", "--batch", "16", "--plan-batch",
             "--steps", "6", "--warmup", "2")  # fmt: skip
    dry = py("bench/train_mfu.py", "--preset", "tiny", "--resolution", "32", "--batch", "4", "--plan-batch",
             "--plan-memory-gib", "0.01", "--txt-tokens", "8", "--steps", "1", "--warmup", "0")  # fmt: skip
    pytest = py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", "{work}/gpu_train.xml")
    return [
        env_step(),
        install_step(cuda=False),  # Triton's kernels only: the numbers a minute of build sooner
        torchao_step("30"),
        Step("gpu-tests", "30", 90, argv=[*pytest, "--timeout=60", "-x", "tests/train"],
             dry_argv=[*pytest, "tests/train/test_memory_plan.py"], junit="gpu_train.xml"),
        Step("train-selective", "30", 240,  # a fresh process compiles the 2b blocks (about a minute)
             argv=[*mfu, "--variants", "compile+selective", "--json", "{work}/train_selective.json"],
             dry_argv=[*dry, "--variants", "compile+selective", "--json", "{work}/train_selective.json",
                       "parallel.compile_backend=aot_eager"],
             json="train_selective.json"),
        Step("train-no-ac", "30", 180,
             argv=[*mfu, "--variants", "compile", "--json", "{work}/train_no_ac.json"],
             dry_argv=[*dry, "--variants", "compile", "--json", "{work}/train_no_ac.json",
                       "parallel.compile_backend=aot_eager"],
             json="train_no_ac.json"),
        Step("train-fp8", "30", 180,
             argv=[*mfu, "--variants", "compile+selective", "--fp8", "torchao", "--json", "{work}/train_fp8.json"],
             dry_argv=[*dry, "--variants", "selective", "--fp8", "torchao", "--json", "{work}/train_fp8.json"],
             json="train_fp8.json"),
        Step("train-eager", "30", 150,
             argv=[*mfu, "--variants", "eager,ac", "--json", "{work}/train_eager.json"],
             dry_argv=[*dry, "--variants", "ac", "--json", "{work}/train_eager.json"],
             json="train_eager.json"),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ shapes

METHODS = ("fm", "selfe")


@dataclasses.dataclass
class ShapesPlan:
    """The ShapesEval pair on the GPU with equal budgets (same model, data, iterations, seed): as many
    iterations as the time left holds after the evaluation, measured by a short calibration of both side
    by side. batch: per step (a 3M-parameter model on 64 tokens leaves the GPU launch-bound at 64, so 256
    costs little more); ema_decay: ~10^4 iterations want a longer EMA than the CPU preset's 0.995."""

    batch: int = 256
    ema_decay: float = 0.999
    max_steps: int = 20_000
    calibration_steps: int = 60
    eval_reserve_s: float = 120.0
    margin: float = 0.8  # share of the time left that the iterations may fill: a run cut short exports nothing
    round_to: int = 100

    def iterations(self, seconds_left: float, step_time: float, startup_s: float) -> int:
        """margin x (time left - evaluation - start-up) / step time, at most max_steps, rounded down."""
        if not step_time > 0:
            return 0
        n = min(self.max_steps, int(self.margin * (seconds_left - self.eval_reserve_s - startup_s) / step_time))
        return max(0, n // self.round_to * self.round_to)


DRY_SHAPES = ShapesPlan(batch=8, max_steps=6, calibration_steps=3, eval_reserve_s=60.0, round_to=1)


def shapes_overrides(session: Session, plan: ShapesPlan, steps: int, run_dir: Path, export: bool) -> list[str]:
    data = session.work / "shapes"
    return [
        f"run_dir={run_dir}",
        f"steps={steps}",
        f"device={'cpu' if session.dry_run else 'cuda'}",
        f"data.manifest={data / 'train.tsv'}",
        f"data.cache_dir={data / 'cache-ae'}",
        f"data.ae_path={data / 'ae.safetensors'}",
        f"data.t5_path={data / 'text_encoder'}",
        f"data.clip_path={data / 'text_encoder_2'}",
        f"data.batch_size={plan.batch}",
        f"objective.tau_warmup={max(1, steps * 3 // 10)}",  # the presets' 30%
        f"ema.decay={plan.ema_decay}",
        "checkpoint.every=0",
        "checkpoint.resume=false",
        f"checkpoint.export_at_end={export}",
        "metrics.log_every=100",
        "metrics.tensorboard=false",
    ]


def train_pair(session: Session, name: str, plan: ShapesPlan, steps: int, timeout: float, export: bool) -> str:
    """Both methods side by side (runs/{name}-{method}); 'ok' or what went wrong with each."""
    # Half the cores each: two processes with a thread per core apiece spin against each other (10x slower).
    threads = str(max(1, (os.cpu_count() or 2) // len(METHODS)))
    procs = {}
    for method in METHODS:
        run_dir = session.work / "runs" / f"{name}-{method}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a second call of the lease starts afresh, not resumed
        argv = [sys.executable, "-m", "selfe.cli", "train", f"shapes-{method}-ae",
                *shapes_overrides(session, plan, steps, run_dir, export)]  # fmt: skip
        log = open(session.work / f"{name}-{method}.log", "w")
        procs[method] = (start(argv, log, {"OMP_NUM_THREADS": threads}), log)
    end, bad = time.monotonic() + timeout, []
    for method, (proc, log) in procs.items():
        status = wait_status(proc, end - time.monotonic())
        log.close()
        if status != "ok":
            bad.append(f"{method} {status}")
        tail = Path(log.name).read_text(errors="replace")[-20_000:]
        session.log.write(f"\n===== {name} {method}: {' '.join(proc.args)}\n{tail}")
    return "; ".join(bad) or "ok"


def step_times(metrics_path: Path) -> tuple[float, float]:
    """(mean step time over the second half, the sum of all step times) of a run's metrics.jsonl."""
    times = [json.loads(line)["step_time"] for line in metrics_path.read_text().splitlines() if line.strip()]
    if not times:
        raise ValueError(f"{metrics_path} has no steps")
    tail = times[len(times) // 2 :]
    return sum(tail) / len(tail), sum(times)


def run_shapes_pair(session: Session, step: Step, timeout: float) -> str:
    plan = DRY_SHAPES if session.dry_run else ShapesPlan()
    began = time.monotonic()
    status = train_pair(session, "calibrate", plan, plan.calibration_steps, timeout, export=False)
    if status != "ok":
        return f"calibration: {status}"
    wall = time.monotonic() - began
    measured = [step_times(session.work / "runs" / f"calibrate-{m}" / "metrics.jsonl") for m in METHODS]
    step_time = max(t for t, _ in measured)  # the pair shares the device: the slower sets the pace
    startup = max(0.0, wall - max(total for _, total in measured))
    left = timeout - wall
    steps = plan.iterations(left, step_time, startup)
    summary = [f"{steps} iterations of {plan.batch} per method, EMA {plan.ema_decay}; calibration: "
               f"{step_time:.4f} s per step side by side, start-up {startup:.0f} s"]  # fmt: skip
    session.record(step.name, iterations=steps, step_time_s=step_time, startup_s=startup, summary=summary)
    if steps < 1:
        return f"skipped (no iterations fit at {step_time:.3f} s each)"
    return train_pair(session, "shapes", plan, steps, left - plan.eval_reserve_s, export=True)


def shapes_steps() -> list[Step]:
    eval_argv = py("-m", "selfe.cli", "eval", "shapes", "--model", "{work}/runs/shapes-fm/export",
                   "{work}/runs/shapes-selfe/export", "--out", "{work}/eval")  # fmt: skip
    # Word-order T5 states (as a trained T5's): position and colour binding are readable from the text tokens,
    # which a run long enough to learn them needs (README, the word-order pair). The trained autoencoder's
    # latents (README, the latent pair: both methods score far higher in them at the same budget).
    data_argv = py("-m", "selfe.cli", "data", "shapes", "--out", "{work}/shapes", "--t5-order-bias", "8",
                   "--autoencoder", "trained", "--no-progress")  # fmt: skip
    return [
        env_step(),
        install_step(cuda=False),  # the tiny model uses no fused kernel: a minute of build saved
        Step("shapes-data", "8", 300, argv=data_argv, dry_argv=[*data_argv, "--num", "128", "--ae-steps", "3"]),
        Step("shapes-pair", "8", math.inf, run=run_shapes_pair, outputs=tuple(f"runs/shapes-{m}" for m in METHODS)),
        Step(
            "shapes-eval", "8", ShapesPlan.eval_reserve_s,
            argv=[*eval_argv, "--steps", "1", "2", "4", "8", "50", "--device", "cuda"],
            dry_argv=[*eval_argv, "--steps", "1", "2", "--images-per-category", "2", "--device", "cpu"],
            json="eval/shapes_eval.json",
            outputs=("eval",),
        ),
    ]  # fmt: skip


def bundle_shapes(session: Session) -> None:
    """A tar per exported model and one of the evaluation, each under the device's 16 MiB a file; only what
    this run's step made and finished (a cut-short pair exports nothing worth returning)."""
    done = {name for name, step in session.results["steps"].items() if step.get("status") == "ok"}
    folders = {}
    if "shapes-pair" in done:
        folders |= {f"shapes-{m}-export.tar.gz": session.work / "runs" / f"shapes-{m}" / "export" for m in METHODS}
    if "shapes-eval" in done:
        folders["shapes-eval.tar.gz"] = session.work / "eval"
    for name, folder in folders.items():
        if folder.is_dir():
            tmp = session.out / f".{name}.tmp"
            with tarfile.open(tmp, "w:gz") as tar:  # an export is 15.5 MB raw, 14.3 gzipped: under 16 MiB
                tar.add(folder, arcname=name.removesuffix(".tar.gz"))
            os.replace(tmp, session.out / name)


def out_problem(out: Path) -> str | None:
    """Why the results folder cannot be made and written into, or None (standard library only, like this
    script: selfe may not be installed yet)."""
    nearest = out
    while not nearest.exists() and nearest != nearest.parent:  # the folder `mkdir -p` would write into
        nearest = nearest.parent
    if not nearest.is_dir():
        return f"{nearest} is a file, not a folder"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"{nearest} is not writable"
    return None


def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU: its device files or nvidia-smi (no torch in this process)."""
    return any(Path("/dev").glob("nvidia*")) or shutil.which("nvidia-smi") is not None


PROFILES = {
    "engine": (engine_steps, None),
    "sampling": (sampling_steps, None),
    "training": (training_steps, None),
    "shapes": (shapes_steps, bundle_shapes),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="the checks to run (required)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (the device's $OUT), unless --plan")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds the whole run may take (default 540)")
    parser.add_argument("--only", default=None, help="comma list of steps to run (env and install always run)")
    parser.add_argument("--plan", action="store_true", help="print the steps and their caps, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="CPU: every step on tiny sizes (checks the plumbing)")
    parser.add_argument("--probe-env", type=Path, default=None, help=argparse.SUPPRESS)  # the env step itself
    args = parser.parse_args(argv)
    if args.probe_env:
        probe_env(args.probe_env)
        return 0
    if args.profile is None:
        parser.error("--profile is required")
    if not args.budget >= MIN_BUDGET_S:
        parser.error(f"--budget must be at least {MIN_BUDGET_S:.0f} s, got {args.budget}")
    if math.isinf(args.budget):  # the lease is finite; an endless budget would let a hung step hold it
        parser.error("--budget must be a finite number of seconds")
    make_steps, finish = PROFILES[args.profile]
    steps = make_steps()
    if args.only:
        wanted, names = set(args.only.split(",")), [s.name for s in steps]
        if not wanted <= set(names):
            parser.error(f"--only: no step {sorted(wanted - set(names))} in profile {args.profile} (steps: {names})")
        steps = [s for s in steps if s.name in wanted | {"env", "install"}]
    if args.plan:
        for s in steps:
            cap = "the rest" if math.isinf(s.cap_s) else f"{s.cap_s:.0f} s"
            env = "".join(f"{k}={v} " for k, v in s.env.items())
            print(f"{s.name:18} issue {s.issue:5} cap {cap:9} {env}{' '.join(s.argv or ['(in-process)'])}")
        return 0
    if args.out is None:
        parser.error("--out is required unless --plan")
    if problem := out_problem(args.out):  # before any step: the report could not be written after them
        parser.error(f"--out {args.out}: {problem}")
    if not args.dry_run and not nvidia_gpu_present():  # else it reinstalls this package and runs the 2b on CPU
        parser.error("needs an NVIDIA GPU (no /dev/nvidia*, no nvidia-smi here); on CPU use --dry-run")
    work = Path(os.environ.get("SELFE_DEVICE_WORK", "/tmp/selfe-device")) / args.profile
    command = " ".join(["python3", "bench/device_session.py", *(sys.argv[1:] if argv is None else argv)])
    results = run_session(args.profile, steps, args.out, work, args.budget, args.dry_run, command, finish)
    print((args.out / "results.md").read_text())
    failed = [n for n, s in results["steps"].items() if not s["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
