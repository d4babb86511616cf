"""FP8 sampling against bf16 in one run: quality over fixed seeds, then speed, per torchao scaling.

For a preset with random weights, each FP8 variant is the same model with its large linears converted
for inference (`SelfEPipeline(fp8=...)`, selfe.components.fp8): torchao "rowwise" and "tensorwise" and,
for each, the same with a per-layer filter: the linears whose own FP8 error (their bf16 input through
the FP8 layer, against the bf16 layer) exceeds `--layer-filter-factor` x the median layer's stay in bf16
(FP8Config.exclude). Then, in this order, so a cut-short run still has the verdict:

1. quality, batch 1, `--seeds` fixed seeds, the same seed for bf16 and FP8: the denoiser output's relative
   error on one forward (bench/fp8.py `relative_error`) and the decoded image's PSNR against bf16's after
   `--steps` steps. A variant whose worst seed crosses `--max-relative-error` or `--min-psnr` fails: its
   row says FAIL and the script exits 1.
2. speed at each `--batch`: the pipeline's call (fast path: compiled + CUDA graph on a GPU) timed by its own
   stages, FP8 against bf16 in the same run: the denoiser step's speed-up and the end to end.

Rows print as measured, a markdown table at the end; --json PATH is rewritten after every row (whole or
not at all), so a run stopped by its time cap returns what it measured. On CPU torchao emulates the FP8
GEMM: the errors are real, the timings are not. Random weights: the errors say how far FP8 moves this
network, not a trained model's images.

    python bench/fp8_sampling.py --preset tiny --resolution 64 --batch 1 2 --seeds 2       # CPU smoke
    python bench/fp8_sampling.py --preset 2b --resolution 512 --batch 1 16 --json fp8_sampling.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` as a package from a checkout

from bench.fp8 import relative_error  # noqa: E402
from bench.sample_throughput import random_text_encoders  # noqa: E402
from selfe.components.autoencoder import AUTOENCODER_PRESETS, AutoEncoder  # noqa: E402
from selfe.components.fp8 import (  # noqa: E402
    TORCHAO_SCALINGS,
    FP8Config,
    converted_modules,
    fp8_autocast_context,
    fp8_plan,
)
from selfe.network.config import PRESETS, mmdit_preset  # noqa: E402
from selfe.network.model import MMDiT  # noqa: E402
from selfe.sampling.pipeline import SelfEPipeline  # noqa: E402
from selfe.sampling.sampler import SamplerConfig  # noqa: E402
from selfe.utils.atomic import atomic_write_bytes, folder_problem  # noqa: E402
from selfe.utils.devices import device_problem  # noqa: E402
from selfe.utils.optional import probe, unavailable_reason  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPT = "a photo of a cat on the table"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2b", help="MMDiT preset (default %(default)s)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default %(default)s)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="speed at these (default 1 16)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=5.0, help="EP-CFG omega (default %(default)s)")
    parser.add_argument("--scalings", nargs="+", choices=TORCHAO_SCALINGS, default=list(TORCHAO_SCALINGS))
    parser.add_argument("--seeds", type=int, default=4, help="quality: seeds 0..N-1 (default %(default)s)")
    # 0.05: a whole e4m3 rounding step short of wrong, as tests/engine/test_pipeline_fp8.py (a bad scale gives
    # errors of order 1); 30 dB: a 3% RMS pixel error. Both to be tightened once a trained model's are measured.
    parser.add_argument(
        "--max-relative-error", type=float, default=0.05,
        help="fail a variant whose denoiser output relative error exceeds this on any seed (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--min-psnr", type=float, default=30.0,
        help="fail a variant whose decoded image is below this PSNR (dB) against bf16 on any seed "
        "(default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--layer-filter-factor", type=float, default=2.0,
        help="also run each scaling with the linears whose FP8 error exceeds this x the median layer's in bf16 "
        "(default %(default)s; 0: no filtered variant)",
    )  # fmt: skip
    parser.add_argument("--txt-tokens", type=int, default=None, help="T5 padded length (default 512; tiny: 64)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per point, median (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here (after every row)")
    args = parser.parse_args(argv)
    # Checked before any model is built: a bad value should cost a second, not a traceback mid-run.
    if min(args.batch) < 1:
        parser.error(f"--batch values must be >= 1, got {' '.join(map(str, args.batch))}")
    for name in ("resolution", "steps", "seeds", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.txt_tokens is not None and args.txt_tokens < 1:
        parser.error(f"--txt-tokens must be >= 1, got {args.txt_tokens}")
    for name in ("guidance", "max_relative_error", "layer_filter_factor"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not math.isfinite(args.min_psnr):
        parser.error(f"--min-psnr must be a finite number of dB, got {args.min_psnr}")
    config = mmdit_preset(args.preset)
    multiple = AUTOENCODER_PRESETS[_autoencoder(args.preset)]().downsample_factor * config.patch_size
    if args.resolution % multiple:
        parser.error(f"--resolution must be a multiple of {multiple}, got {args.resolution}")
    if args.device is not None and (problem := device_problem(args.device)):
        parser.error(problem)
    if not probe("torchao").available:
        parser.error(f"FP8 needs torchao: {unavailable_reason('torchao')}")
    if args.json is not None:
        problem = "is a directory" if args.json.is_dir() else folder_problem(args.json.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    return args


def _autoencoder(preset: str) -> str:
    return "tiny" if preset == "tiny" else "flux1"


def psnr(image: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf when equal)."""
    mse = (image.double() - reference.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def denoiser_inputs(pipe: SelfEPipeline, seed: int, latent: int) -> tuple[Tensor, Tensor, Tensor, dict]:
    """One seed's denoiser inputs for one forward: noise, t, s and the bench prompt's condition."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, pipe.model.config.in_channels, latent, latent, generator=g).to(pipe.device, pipe.dtype)
    t = (torch.rand(1, generator=g) * 0.8 + 0.1).to(pipe.device)
    s = t * torch.rand(1, generator=g).to(pipe.device)
    cond, _ = pipe.encode_prompts([PROMPT], guided=False)
    return x, t, s, cond


@torch.no_grad()
def layer_errors(base: nn.Module, fp8: nn.Module, config: FP8Config, inputs: tuple) -> dict[str, float]:
    """Each converted linear's own FP8 error: its bf16 input (hooked in the bf16 forward) through the FP8
    layer, relative to the bf16 layer's output."""
    errors, handles = {}, []
    for name, decision in fp8_plan(base, config).items():
        if decision != "fp8":
            continue

        def hook(module: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            with fp8_autocast_context(config):
                errors[name] = relative_error(fp8.get_submodule(name)(args[0]), out)

        handles.append(base.get_submodule(name).register_forward_hook(hook))
    try:
        base(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return errors


def filtered(config: FP8Config, errors: dict[str, float], factor: float) -> tuple[FP8Config, list[str]] | None:
    """The config with the linears over factor x the median layer error excluded; None when none is over."""
    limit = factor * statistics.median(errors.values())
    worst = sorted((name for name, err in errors.items() if err > limit), key=errors.get, reverse=True)
    if not worst:
        return None
    return FP8Config(**{**config.to_dict(), "exclude": (*config.exclude, *worst)}), worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = mmdit_preset(args.preset)
    tiny = args.preset == "tiny"
    ae_config = AUTOENCODER_PRESETS[_autoencoder(args.preset)]()
    latent = args.resolution // ae_config.downsample_factor
    torch.manual_seed(0)
    with torch.device(device):
        model = MMDiT(config).to(dtype)
        autoencoder = AutoEncoder(ae_config).to(dtype).eval()
    with torch.no_grad():  # adaLN-Zero zeros the gates at init: random everywhere, so every layer counts
        for param in model.parameters():
            param.normal_(0, 0.02)
    txt_tokens = args.txt_tokens or (64 if tiny else 512)
    text = random_text_encoders(config.txt_dim, config.vec_dim, txt_tokens, device, dtype, real_shape=not tiny)
    kwargs = {"sampler_defaults": SamplerConfig(steps=args.steps, guidance=args.guidance)}
    base = SelfEPipeline.from_components(model, autoencoder, text, **kwargs)

    variants: dict[str, tuple[SelfEPipeline, list[str]]] = {}
    per_layer: dict[str, dict] = {}  # each scaling's linears' own FP8 errors: median, max, the worst five
    for scaling in args.scalings:
        fp8 = FP8Config(recipe="torchao", scaling=scaling, fsdp_float8_all_gather=False)
        pipe = SelfEPipeline.from_components(copy.deepcopy(model), autoencoder, text, fp8=fp8, **kwargs)
        variants[scaling] = (pipe, [])
        errors = layer_errors(base.model, pipe.model, fp8, denoiser_inputs(base, 0, latent))
        worst = sorted(errors, key=errors.get, reverse=True)[:5]
        per_layer[scaling] = {
            "median": statistics.median(errors.values()),
            "max": max(errors.values()),
            "worst": {name: errors[name] for name in worst},
        }
        if args.layer_filter_factor > 0:
            chosen = filtered(fp8, errors, args.layer_filter_factor)
            if chosen is not None:
                kept_config, excluded = chosen
                pipe = SelfEPipeline.from_components(copy.deepcopy(model), autoencoder, text, fp8=kept_config, **kwargs)
                variants[f"{scaling}+filter"] = (pipe, excluded)

    result = {
        "preset": args.preset,
        "resolution": args.resolution,
        "steps": args.steps,
        "guidance": args.guidance,
        "seeds": args.seeds,
        "max_relative_error": args.max_relative_error,
        "min_psnr": args.min_psnr,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "layer_errors": per_layer,
        "quality": [],
        "speed": [],
    }

    def save() -> None:
        if args.json:  # temp file then rename, after every row: a run cut short keeps what it measured
            atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())

    print(f"{QUALITY_HEADER}\n{_rule(QUALITY_HEADER)}", flush=True)
    call = {"height": args.resolution, "width": args.resolution, "output_type": "pt", "fast": False}
    reference = [base([PROMPT], seed=seed, **call).images for seed in range(args.seeds)]
    for name, (pipe, excluded) in variants.items():
        errors, psnrs = [], []
        for seed in range(args.seeds):
            inputs = denoiser_inputs(base, seed, latent)
            with torch.no_grad(), fp8_autocast_context(pipe.fp8):
                errors.append(relative_error(pipe.model(*inputs), base.model(*inputs)))
            psnrs.append(psnr(pipe([PROMPT], seed=seed, **call).images, reference[seed]))
        passed = max(errors) <= args.max_relative_error and min(psnrs) >= args.min_psnr
        row = {
            "variant": name,
            "scaling": pipe.fp8.scaling,
            "converted_linears": len(converted_modules(pipe.model)),
            "excluded_by_filter": excluded,
            "relative_error_max": max(errors),
            "relative_error_mean": statistics.fmean(errors),
            "psnr_min": min(psnrs),
            "psnr_mean": statistics.fmean(psnrs),
            "passed": passed,
        }
        result["quality"].append(row)
        save()
        print(_quality_md(row), flush=True)

    print(f"\n{SPEED_HEADER}\n{_rule(SPEED_HEADER)}", flush=True)
    for batch in args.batch:
        prompts = [PROMPT] * batch
        timed = {"height": args.resolution, "width": args.resolution, "output_type": "pt"}
        baseline = None
        for name, pipe in [("bf16", base), *((n, p) for n, (p, _) in variants.items())]:
            warmup_s = pipe.warmup(batch, args.resolution, args.resolution, text_tokens=_prompt_tokens(base))
            pipe(prompts, seed=0, **timed)  # the step count's grid tables
            calls = [dict(pipe(prompts, seed=0, **timed).timings) for _ in range(args.iters)]
            median = sorted(calls, key=lambda c: c["end_to_end"])[len(calls) // 2]
            row = {
                "variant": name,
                "batch": batch,
                "step_ms": median["denoise"] / args.steps * 1e3,
                "end_to_end_ms": median["end_to_end"] * 1e3,
                "warmup_s": warmup_s,
            }
            baseline = baseline or row
            row["step_speedup"] = baseline["step_ms"] / row["step_ms"]
            row["end_to_end_speedup"] = baseline["end_to_end_ms"] / row["end_to_end_ms"]
            result["speed"].append(row)
            save()
            print(_speed_md(row), flush=True)
            pipe.fast.forget_captures()  # this batch's graphs: memory for the next

    print("\n" + markdown(result))
    return 0 if all(row["passed"] for row in result["quality"]) else 1


def _prompt_tokens(pipe: SelfEPipeline) -> int:
    cond, _ = pipe.encode_prompts([PROMPT], guided=False)
    return int(cond["txt_mask"].sum())


QUALITY_HEADER = "| variant | linears in FP8 | kept bf16 by the filter | rel. error max (mean) | PSNR dB min (mean) | |"
SPEED_HEADER = "| variant | batch | ms/step | x bf16 step | end to end ms | x bf16 end to end | warm-up s |"


def _rule(header: str) -> str:
    return "|---" * (header.count("|") - 1) + "|"


def _quality_md(r: dict) -> str:
    kept = len(r["excluded_by_filter"]) or ""
    return (
        f"| {r['variant']} | {r['converted_linears']} | {kept} | {r['relative_error_max']:.3e} "
        f"({r['relative_error_mean']:.3e}) | {r['psnr_min']:.1f} ({r['psnr_mean']:.1f}) | "
        f"{'ok' if r['passed'] else '**FAIL**'} |"
    )


def _speed_md(r: dict) -> str:
    return (
        f"| {r['variant']} | {r['batch']} | {r['step_ms']:.2f} | x{r['step_speedup']:.2f} | "
        f"{r['end_to_end_ms']:.2f} | x{r['end_to_end_speedup']:.2f} | {r['warmup_s']:.1f} |"
    )


def markdown(result: dict) -> str:
    return "\n".join(
        [
            f"FP8 (torchao) against bf16, {result['preset']} at {result['resolution']}², {result['steps']} steps, "
            f"CFG {result['guidance']}, {result['device']}, torch {result['torch']}. Quality over {result['seeds']} "
            f"seeds at batch 1 (denoiser output relative error; decoded image PSNR against bf16's); a variant "
            f"fails above {result['max_relative_error']} or below {result['min_psnr']} dB.",
            "",
            QUALITY_HEADER,
            _rule(QUALITY_HEADER),
            *map(_quality_md, result["quality"]),
            "",
            "Speed: the pipeline's call (fast path), the denoiser step and the end to end against bf16 in this run.",
            "",
            SPEED_HEADER,
            _rule(SPEED_HEADER),
            *map(_speed_md, result["speed"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
