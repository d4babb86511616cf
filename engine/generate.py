"""`selfe generate`: images for some prompts at several step counts from one model, and a grid of them.

    selfe generate --model DIR --prompt "a photo of a cat" "a red dog" --steps 1 2 4 8 --seed 0 --out grid.png

Writes every image as OUT_STEM_p{prompt index}_{steps}steps.png beside the grid, and the grid itself
(rows: prompts, columns: step counts, left to right as given); images of that name that an earlier run
left there and this one did not rewrite are removed, so the folder holds one run. All prompts of one
step count run as one batch, with the same seed at every step count, so a row shows one noise draw
sampled at each budget. DIR is a pipeline directory (see `selfe.sampling.pipeline`); without --model, the
ShapesEval model shipped with the package (`selfe.shapes.shipped_model_dir()`) is used when this
install has it.
Images are written at the model's native resolution unless --height / --width say otherwise, and
upscaled (nearest neighbour, --upscale) so that small ones (ShapesEval's 32x32) are visible.
Requests are bounded before the model samples: the pipeline's RequestLimits (images per call, image tokens, steps;
selfe.sampling.request_limits), a written image's side after upscaling (MAX_OUTPUT_SIDE) and the grid's pixels
(MAX_GRID_PIXELS); --no-limits lifts them all. A model whose output holds NaN or Inf writes nothing (exit 3).
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import re
import sys
import warnings
from pathlib import Path

from selfe.utils.atomic import atomic_write_bytes, folder_problem
from selfe.utils.devices import device_problem

NO_MODEL_HELP = """selfe generate: error: no model given; pass --model DIR.
(This install lacks the shipped ShapesEval model, selfe/assets/shapes-selfe/, that is used by default.)
DIR is a pipeline directory holding:
  model.safetensors + config.json   a trained Self-E MMDiT, as the trainer exports it: `selfe train 2b
                                    data.cache_dir=... run_dir=runs/2b` writes RUN_DIR/export/ at the end
                                    (`selfe train smoke` makes a tiny one), or copy a released export
  ae.safetensors                    the FLUX.1 autoencoder (ae.safetensors of FLUX.1-schnell), or pass --ae
  text_encoder/, text_encoder_2/    local T5-XXL encoder and CLIP ViT-L/14 text snapshots, or pass --t5 / --clip
Nothing is downloaded: every path must be local."""
AUTO_UPSCALE_MIN_SIDE = 128  # --upscale auto: the smallest integer factor that makes the image side >= this
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_OUTPUT_SIDE = 8192  # pixels a side of a written image, upscaling included (--no-limits lifts it)
MAX_GRID_PIXELS = 2**28  # pixels of the grid (16384², 768 MiB as RGB: 2b's 2048² at 4 prompts x 8 step counts fits)


def upscale_factor(value: str) -> int | str:
    """argparse type of --upscale: "auto" or an integer >= 1."""
    if value == "auto":
        return value
    try:
        factor = int(value)
    except ValueError:
        factor = 0
    if factor < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {value!r}")
    return factor


def positive_int(value: str) -> int:
    """argparse type of --height / --width: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def out_problem(out: Path) -> str | None:
    """Why the grid (and its single images beside it) cannot be written to `out`, or None when they can.
    Checked before the model loads, so a bad --out does not cost a whole sampling run."""
    from PIL import Image

    if out.is_dir():
        return f"--out {str(out)!r} is a directory; pass the grid's file path, e.g. {str(out / 'grid.png')!r}"
    image_format = Image.registered_extensions().get(out.suffix.lower())
    try:  # a registered suffix can still lack a writer for RGB (.xbm, .pfm, stub formats)
        if image_format is None:
            raise ValueError("no image format")
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError):
        kind = repr(out.suffix) if out.suffix else "a file without a suffix"
        return f"--out {str(out)!r}: PIL cannot write an RGB image as {kind}; use .png, .jpg or .webp"
    problem = folder_problem(out.parent)  # mkdir runs after sampling
    return None if problem is None else f"--out {str(out)!r}: {problem}"


def output_problem(height: int, width: int, factor: int, rows: int, columns: int) -> str | None:
    """Why the upscaled images or their grid (rows x columns of them) would be too large to write, or None.
    Checked before sampling, so `--upscale 100000` is one line, not an allocation the OOM killer ends."""
    side = max(height, width) * factor
    if side > MAX_OUTPUT_SIDE:
        return (
            f"--upscale {factor} makes the {width}x{height} images {width * factor}x{height * factor}, over "
            f"{MAX_OUTPUT_SIDE} pixels a side (the limit on a written image; pass a smaller --upscale, or --no-limits)"
        )
    pixels = rows * height * factor * columns * width * factor
    if pixels > MAX_GRID_PIXELS:
        return (
            f"the grid of {rows} prompts x {columns} step counts of {width * factor}x{height * factor} images would "
            f"be {pixels} pixels, over {MAX_GRID_PIXELS} (2^28, the limit on the grid): pass fewer prompts or "
            "step counts, a smaller --upscale, or --no-limits"
        )
    return None


def auto_upscale(height: int, width: int, min_side: int = AUTO_UPSCALE_MIN_SIDE) -> int:
    """The smallest integer factor making the image's shorter side >= min_side (1 for large images)."""
    return max(1, math.ceil(min_side / min(height, width)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfe generate",
        description="Generate images at several step counts with one Self-E model and write a grid "
        "(rows: prompts, columns: step counts).",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="pipeline directory (model.safetensors + config.json); default: the shipped ShapesEval model",
    )
    parser.add_argument("--prompt", nargs="+", default=None, help="one or more prompts")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8], help="step counts (default 1 2 4 8)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed, 0 to 2^64 - 1 (default 0)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="EP-CFG omega >= 0 (0: unconditional, 1: conditional). Default: the model's config.json "
        "sampler.guidance, written at export from checkpoint.export_guidance (1.5 for the shipped model)",
    )
    parser.add_argument("--no-guidance", action="store_true", help="sample without CFG (one forward per step)")
    parser.add_argument("--sampler", choices=("ddim", "euler"), default=None)
    parser.add_argument("--s-policy", choices=("next", "current", "midpoint", "fixed"), default=None)
    parser.add_argument(
        "--height", type=positive_int, default=None, help="pixels (default: the model's resolution, else 512)"
    )
    parser.add_argument(
        "--width", type=positive_int, default=None, help="pixels (default: the model's resolution, else 512)"
    )
    parser.add_argument(
        "--upscale",
        type=upscale_factor,
        default="auto",
        help="integer nearest-neighbour upscaling of the written images and grid; auto (default): the "
        f"smallest making the image side >= {AUTO_UPSCALE_MIN_SIDE} (1 for large images)",
    )
    parser.add_argument("--out", type=Path, default=Path("selfe_grid.png"), help="grid image path")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--ae", type=Path, default=None, help="autoencoder .safetensors (default: DIR/ae.safetensors)")
    parser.add_argument("--t5", type=Path, default=None, help="T5 snapshot folder")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP text snapshot folder")
    parser.add_argument("--eager", action="store_true", help="plain eager sampling (no torch.compile, no CUDA graph)")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the step: auto = on CUDA only (default), on, off",
    )
    parser.add_argument(
        "--fp8",
        choices=("none", "torchao", "te"),
        default="none",
        help="FP8 linears for sampling: torchao float8 (emulated off FP8 GPUs) or Transformer Engine",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-limits",
        action="store_true",
        help="lift the request limits (images per call, image tokens, steps: selfe.RequestLimits) and the "
        f"output-size limits ({MAX_OUTPUT_SIDE} px a side, {MAX_GRID_PIXELS} px a grid); for machines that can take it",
    )
    return parser


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point of `selfe generate`; returns the exit code (0 ok, 2 bad arguments or a model that does not
    load, 1 a failure while writing the images, 3 a model whose output holds NaN or Inf: nothing written).
    Argument errors found by argparse or the up-front checks exit 2 through SystemExit, as argparse does."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.model is None:
        from selfe.shapes import shipped_model_dir

        args.model = shipped_model_dir()
        if args.model is None:
            print(NO_MODEL_HELP, file=sys.stderr)
            return 2
        print(f"selfe generate: no --model given; using the shipped ShapesEval model {args.model}", file=sys.stderr)
    if not args.prompt:
        print("selfe generate: error: pass at least one --prompt", file=sys.stderr)
        return 2
    if any(s < 1 for s in args.steps) or len(set(args.steps)) < len(args.steps):
        print(f"selfe generate: error: --steps must be distinct counts >= 1, got {args.steps}", file=sys.stderr)
        return 2
    # Every argument is checked here, before the model loads and samples (a bad one: one line, exit 2).
    problem = argument_problem(args)
    if problem is not None:
        parser.exit(2, f"selfe generate: error: {problem}\n")

    import torch
    from tqdm import tqdm

    from selfe.sampling.fast_path import FastPathConfig
    from selfe.sampling.nonfinite import NonFiniteOutputWarning
    from selfe.sampling.pipeline import SelfEPipeline
    from selfe.sampling.request_limits import RequestLimits

    compile_step = {"auto": "auto", "on": True, "off": False}[args.compile]
    fast_path = FastPathConfig(compile=False if args.eager else compile_step)
    try:
        pipe = SelfEPipeline.from_pretrained(
            args.model,
            torch_dtype=args.dtype,
            device=args.device,
            autoencoder_path=args.ae,
            t5_path=args.t5,
            clip_path=args.clip,
            fast_path=fast_path,
            fp8=args.fp8,
        )
    except (FileNotFoundError, OSError, ValueError, TypeError, RuntimeError) as err:
        # 2, as for any unusable argument (`selfe eval shapes` checks its --model folders the same way)
        print(f"selfe generate: error: could not load the pipeline from {str(args.model)!r}: {err}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)  # this command's own bar counts the steps of every call
    if args.no_limits:
        pipe.limits = RequestLimits.none()
    height, width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    factor = auto_upscale(height, width) if args.upscale == "auto" else args.upscale
    problem = None if args.no_limits else output_problem(height, width, factor, len(args.prompt), len(args.steps))
    if problem is not None:
        print(f"selfe generate: error: {problem}", file=sys.stderr)
        return 2

    guidance = None if args.no_guidance else (args.guidance if args.guidance is not None else ...)
    call_kwargs = dict(
        height=args.height, width=args.width, sampler=args.sampler, s_policy=args.s_policy, fast=not args.eager
    )
    if guidance is not ...:
        call_kwargs["guidance"] = guidance
    columns = []
    bar = tqdm(total=sum(args.steps), unit="step", disable=args.no_progress, file=sys.stderr)
    try:
        for steps in args.steps:
            bar.set_description(f"{steps} step{'s' if steps > 1 else ''}")
            generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonFiniteOutputWarning)  # an error below instead
                out = pipe(
                    args.prompt,
                    steps=steps,
                    generator=generator,
                    progress=lambda _k: bar.update(1),
                    **call_kwargs,
                )
            if out.nonfinite is not None:
                bar.close()
                print(
                    f"selfe generate: error: the model {str(args.model)!r} at {steps} step{'s' * (steps > 1)}: "
                    f"{out.nonfinite}; no image written",
                    file=sys.stderr,
                )
                return 3
            columns.append(out.images)
    except (ValueError, TypeError) as err:
        bar.close()
        print(f"selfe generate: error: {err}", file=sys.stderr)
        return 2
    bar.close()

    width, height = columns[0][0].size
    columns = [[upscale(image, factor) for image in column] for column in columns]
    paths = []
    try:  # checked up front, but the disk can still fill or the folder change meanwhile
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for steps, images in zip(args.steps, columns):
            for i, image in enumerate(images):
                path = args.out.with_name(f"{args.out.stem}_p{i:02d}_{steps}steps.png")
                save_image(image, path)
                paths.append(path)
        save_image(image_grid(columns), args.out)
        stale = earlier_images(args.out, keep=paths)
        for path in stale:
            path.unlink(missing_ok=True)
    except OSError as err:
        print(f"selfe generate: error: could not write the images: {err}", file=sys.stderr)
        return 1
    scaled = f", upscaled {factor}x from {width}x{height}" if factor > 1 else ""
    count = f"{len(paths)} image{'s' * (len(paths) != 1)}"
    removed = f"; removed {len(stale)} image{'s' * (len(stale) != 1)} of an earlier run beside it" if stale else ""
    print(f"wrote {count} and the grid {args.out} (rows: prompts, columns: steps {args.steps}{scaled}){removed}")
    return 0


def save_image(image, path: Path) -> None:
    """Encode in memory, then write to a temp file and rename: an interrupted run leaves no half image."""
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()])
    atomic_write_bytes(path, buffer.getvalue())


def earlier_images(out: Path, keep: list[Path]) -> list[Path]:
    """The single images an earlier run with the same --out left beside the grid (more prompts or other
    step counts) that this run did not rewrite: left there, they would pass for this run's."""
    pattern = re.compile(re.escape(out.stem) + r"_p\d{2,}_\d+steps\.png")
    kept = {path.name for path in keep}
    return sorted(
        path
        for path in out.parent.glob(f"{glob.escape(out.stem)}_p*steps.png")
        if pattern.fullmatch(path.name) and path.name not in kept
    )


def argument_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the parsed arguments that needs no model to see, or None.
    (Sizes that are not a multiple of the model's patch are caught by the pipeline, before sampling.)"""
    from selfe.sampling.request_limits import RequestLimits, guidance_problem

    if args.guidance is not None:
        if args.no_guidance:
            return "--guidance and --no-guidance contradict each other; pass one"
        if (problem := guidance_problem(args.guidance)) is not None:
            return f"--guidance {problem} (or pass --no-guidance), got {args.guidance}"
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed must be in [0, 2^64 - 1], got {args.seed}"
    if not args.no_limits:  # what needs no model to see; sizes are checked once it has loaded
        limits = RequestLimits()
        try:
            limits.check_images(len(args.prompt), f"{len(args.prompt)} --prompt values")
            limits.check_steps(max(args.steps))
        except ValueError as err:
            return str(err)
    problem = out_problem(args.out)
    if problem is None and args.device is not None:
        problem = device_problem(args.device)
    if problem is None and args.dtype is not None:
        import torch

        from selfe.components.text_encoders import resolve_dtype

        try:
            resolve_dtype(args.dtype, torch.device("cpu"))
        except ValueError:
            problem = f"--dtype must be bf16, fp16 or fp32, got {args.dtype!r}"
    return problem


def upscale(image, factor: int):
    """A PIL image enlarged `factor` times per side, nearest neighbour (pixels stay sharp squares)."""
    if factor == 1:
        return image
    from PIL import Image

    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def image_grid(columns: list[list]):
    """PIL images as columns[c][r] -> one image, column c left to right, row r top to bottom."""
    from PIL import Image

    width, height = columns[0][0].size
    rows = len(columns[0])
    grid = Image.new("RGB", (width * len(columns), height * rows))
    for c, column in enumerate(columns):
        for r, image in enumerate(column):
            grid.paste(image, (c * width, r * height))
    return grid


if __name__ == "__main__":
    raise SystemExit(generate_main())
