"""`selfe eval shapes`: score models on ShapesEval at several step counts, GenEval style.

    selfe eval shapes --model runs/shapes-fm/export runs/shapes-selfe/export --steps 1 2 4 8 50 --out runs/eval

For every model and step count, the fixed evaluation prompts (`scene.evaluation_prompts`: the same
number of images per category) are sampled with the same seeds, scored by `selfe.shapes.scorer`, and
summarised per category and overall (the mean of the categories). `--samples-per-prompt K` samples every
prompt K times with fresh noise (GenEval samples 4 per prompt) and scores all of them, which narrows the
spread that one noise draw per image leaves in the score. Prints a markdown table and writes
OUT/shapes_eval.json and OUT/shapes_grid_{name}.png (rows: prompts, two per category; columns: steps).
With no --model, the shipped ShapesEval model is evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfe.shapes.scene import CATEGORIES, Prompt, evaluation_prompts

DEFAULT_STEPS = (1, 2, 4, 8, 50)
UNSET: Any = ...  # guidance argument not given: the model's own default


@dataclass
class EvalConfig:
    """steps: step counts; images_per_category: evaluation images per category (one prompt each, see
    scene.evaluation_prompts); samples_per_prompt: noise draws per prompt, all scored; seed: noise seed (batch k
    of draw j uses seed + j * batches + k at every step count, so no two batches share noise);
    prompt_seed: the shuffle of the evaluation prompts (the default is the held-out set the README reports;
    another seed, with other noise seeds, is a validation set for choosing sampler settings);
    guidance: EP-CFG omega, None for none, UNSET for the model's default; sampler / s_policy / eta: None for
    the model's defaults (s_policy "current" is s = t, how a flow-matching model is sampled; eta: DDIM's
    noise share); time_shift_mu: the sampling grid's shift mu (None: the model's); batch_size: images per
    call."""

    steps: tuple[int, ...] = DEFAULT_STEPS
    images_per_category: int = 48
    samples_per_prompt: int = 1
    prompt_seed: int = 20_251_123
    seed: int = 0
    guidance: float | None = UNSET
    sampler: str | None = None
    s_policy: str | None = None
    eta: float | None = None
    time_shift_mu: float | None = None
    batch_size: int = 96
    grid_per_category: int = 2

    def __post_init__(self) -> None:
        self.steps = tuple(self.steps)
        if (
            not self.steps
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps)
            or len(set(self.steps)) < len(self.steps)  # one table row, one grid column per count
        ):
            raise ValueError(f"steps must be distinct integers >= 1, got {self.steps}")
        for name in ("images_per_category", "samples_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")
        if self.time_shift_mu is not None and not math.isfinite(self.time_shift_mu):
            raise ValueError(f"time_shift_mu must be finite, got {self.time_shift_mu}")
        if isinstance(self.guidance, (int, float)) and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.seed < 0 or self.prompt_seed < 0:
            raise ValueError(f"seed and prompt_seed must be >= 0, got {self.seed}, {self.prompt_seed}")


def generate_images(
    pipe: Any, prompts: Sequence[Prompt], steps: int, config: EvalConfig, first_seed: int | None = None
) -> np.ndarray:
    """(N, H, W, 3) uint8 images of the prompts at `steps`, in batches with seeds first_seed + batch index
    (first_seed defaults to config.seed)."""
    import torch

    first_seed = config.seed if first_seed is None else first_seed
    out = []
    for k, start in enumerate(range(0, len(prompts), config.batch_size)):
        chunk = [p.caption for p in prompts[start : start + config.batch_size]]
        generator = torch.Generator(device=pipe.device).manual_seed(first_seed + k)
        kwargs = {} if config.guidance is UNSET else {"guidance": config.guidance}
        with _time_shift(pipe, config.time_shift_mu):
            result = pipe(chunk, steps=steps, generator=generator, output_type="np", sampler=config.sampler,
                          s_policy=config.s_policy, eta=config.eta, **kwargs)  # fmt: skip
        out.append((np.asarray(result.images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


@contextmanager
def _time_shift(pipe: Any, mu: float | None) -> Iterator[None]:
    """The pipeline samples on a grid shifted by `mu` inside the block (None: its own). The grid's shift is
    one of the pipeline's sampler defaults, not a call argument, so it is set and restored around the call."""
    if mu is None:
        yield
        return
    from selfe.method.schedule import TimeShift

    saved = pipe.sampler_defaults
    pipe.sampler_defaults = dataclasses.replace(saved, time_shift=TimeShift(mu=mu))
    try:
        yield
    finally:
        pipe.sampler_defaults = saved


def evaluate(
    pipe: Any, config: EvalConfig, on_step_count: Callable[[int, dict], None] | None = None
) -> tuple[dict, dict[int, np.ndarray]]:
    """Scores per step count {"steps": {n: summary}, "config": ...} and the generated images per step count
    (of the first noise draw). With several samples per prompt, a summary scores every draw's images and adds
    "overall_per_draw", the overall score of each draw alone."""
    from selfe.shapes.scorer import score_image, summarize

    prompts = evaluation_prompts(config.images_per_category, config.prompt_seed)
    results: dict[str, Any] = {"config": {**asdict(config), "guidance": _guidance_label(config.guidance)}}
    results["steps"], images = {}, {}
    batches = -(-len(prompts) // config.batch_size)
    for steps in config.steps:
        start = time.perf_counter()
        correct, per_draw = [], []
        for draw in range(config.samples_per_prompt):
            drawn = generate_images(pipe, prompts, steps, config, first_seed=config.seed + draw * batches)
            verdicts = [score_image(p, image) for p, image in zip(prompts, drawn)]
            per_draw.append(summarize(prompts, verdicts)["overall"])
            correct += verdicts
            if draw == 0:
                images[steps] = drawn
        summary = summarize(list(prompts) * config.samples_per_prompt, correct)
        if config.samples_per_prompt > 1:
            summary["overall_per_draw"] = per_draw
        summary["seconds"] = round(time.perf_counter() - start, 2)
        results["steps"][str(steps)] = summary
        if on_step_count is not None:
            on_step_count(steps, summary)
    return results, images


def grid(images: dict[int, np.ndarray], config: EvalConfig, scale: int = 4) -> np.ndarray:
    """(rows * H * scale, columns * W * scale, 3) uint8: `grid_per_category` prompts per category down,
    step counts across, each image nearest-upscaled by `scale`, 2 px white gutters."""
    per = config.images_per_category
    rows = [c * per + i for c in range(len(CATEGORIES)) for i in range(min(config.grid_per_category, per))]
    tiles = [[images[s][r].repeat(scale, 0).repeat(scale, 1) for s in config.steps] for r in rows]
    h, w = tiles[0][0].shape[:2]
    gap = 2
    out = np.full((len(rows) * (h + gap) - gap, len(config.steps) * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tile
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """Rows: model x step count; columns: overall, then the categories."""
    head = "| model | steps | overall | " + " | ".join(CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (3 + len(CATEGORIES))]
    for name, result in results.items():
        for steps, summary in result["steps"].items():
            cells = [f"{summary['categories'].get(c, float('nan')):.3f}" for c in CATEGORIES]
            lines.append(f"| {name} | {steps} | **{summary['overall']:.3f}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _guidance_label(guidance: Any) -> Any:
    return "model default" if guidance is UNSET else guidance


def _model_name(path: Path, taken: set[str]) -> str:
    parts = path.resolve().parts
    name = parts[-2] if parts[-1] == "export" and len(parts) > 1 else parts[-1]
    while name in taken:
        name += "'"
    taken.add(name)
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfe eval", description="Evaluate models on a built-in benchmark.")
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    p = sub.add_parser("shapes", help="ShapesEval: GenEval-style scores per category at several step counts")
    p.add_argument(  # extend: `--model A B` and `--model A --model B` both evaluate A and B
        "--model", type=Path, nargs="+", action="extend", default=None,
        help="pipeline directories (default: the shipped ShapesEval model)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    p.add_argument("--images-per-category", type=int, default=EvalConfig.images_per_category)
    p.add_argument(
        "--samples-per-prompt", type=int, default=EvalConfig.samples_per_prompt,
        help="noise draws per prompt, all scored (GenEval: 4)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument(
        "--prompt-seed", type=int, default=EvalConfig.prompt_seed,
        help="shuffle of the evaluation prompts (default: the held-out set; another one is a validation set)",
    )  # fmt: skip
    p.add_argument("--guidance", type=float, default=None, help="EP-CFG omega (default: the model's)")
    p.add_argument("--no-guidance", action="store_true", help="no CFG")
    p.add_argument("--sampler", choices=("ddim", "euler"), default=None)
    p.add_argument(  # ("fixed" needs a value of s: the library API has it)
        "--s-policy", choices=("next", "current", "midpoint"), default=None,
        help="s_k (default: the model's; next: s = t_{k+1}; current: s = t, flow matching)",
    )  # fmt: skip
    p.add_argument("--eta", type=float, default=None, help="DDIM noise share in [0, 1] (default: the model's)")
    p.add_argument(
        "--time-shift-mu", type=float, default=None,
        help="mu of the sampling grid's time shift (default: the model's; 0: no shift)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--out", type=Path, default=Path("runs/eval-shapes"), help="folder for the JSON and grids")
    p.add_argument("--device", default=None)
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """One line and exit 2 (parser.error would print the long usage first)."""
    parser.exit(2, f"selfe eval: error: {message}\n")


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `selfe eval`; 0 on success, 2 for bad arguments, 1 when a model fails to load."""
    parser = build_parser()
    args = parser.parse_args(argv)
    guidance = None if args.no_guidance else (UNSET if args.guidance is None else args.guidance)
    try:
        config = EvalConfig(
            steps=tuple(args.steps),
            images_per_category=args.images_per_category,
            samples_per_prompt=args.samples_per_prompt,
            prompt_seed=args.prompt_seed,
            seed=args.seed,
            guidance=guidance,
            sampler=args.sampler,
            s_policy=args.s_policy,
            eta=args.eta,
            time_shift_mu=args.time_shift_mu,
            batch_size=args.batch_size,
        )
    except ValueError as err:  # EvalConfig names its fields: name the flags (same names, dashed) instead
        flags = [f.name for f in dataclasses.fields(EvalConfig) if f.name in vars(args)]
        field = re.compile(rf"\b({'|'.join(flags)})\b")
        _fail(parser, field.sub(lambda m: "--" + m.group(0).replace("_", "-"), str(err)))
    models = args.model
    if models is None:
        from selfe.shapes import shipped_model_dir

        shipped = shipped_model_dir()
        if shipped is None:
            parser.error("no --model given and this install has no shipped ShapesEval model")
        models = [shipped]
    # Every model folder and the other arguments are checked before the first model is evaluated, so a typo
    # in the last --model does not surface only after the others have run.
    from selfe.sampling.pipeline_files import check_pipeline_dir
    from selfe.utils.devices import device_problem

    for path in models:
        try:
            check_pipeline_dir(path)
        except (OSError, ValueError, TypeError) as err:
            _fail(parser, f"--model {str(path)!r}: {err}")
    if args.device is not None and (problem := device_problem(args.device)) is not None:
        _fail(parser, problem)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(parser, f"--out {str(args.out)!r}: cannot make the folder: {err}")

    from PIL import Image

    from selfe.sampling.fast_path import FastPathConfig
    from selfe.sampling.pipeline import SelfEPipeline

    all_results: dict[str, dict] = {}
    taken: set[str] = set()
    for path in models:
        name = _model_name(path, taken)
        try:
            pipe = SelfEPipeline.from_pretrained(path, device=args.device, fast_path=FastPathConfig(cuda_graph="auto"))
        except (FileNotFoundError, OSError, ValueError, TypeError) as err:
            print(f"selfe eval: error: could not load {str(path)!r}: {err}", file=sys.stderr)
            return 1
        pipe.set_progress_bar_config(disable=True)  # hundreds of short calls: one line per step count instead

        def report(steps: int, summary: dict, name: str = name) -> None:
            line = f"{name}: {steps} steps: overall {summary['overall']:.3f}"
            if "overall_per_draw" in summary:
                line += " (draws " + " ".join(f"{x:.3f}" for x in summary["overall_per_draw"]) + ")"
            line += f" ({summary['seconds']:.1f} s)"
            print(line, file=sys.stderr)

        results, images = evaluate(pipe, config, report)
        results["model"] = str(path)
        all_results[name] = results
        Image.fromarray(grid(images, config)).save(args.out / f"shapes_grid_{name.strip(chr(39))}.png")
    from selfe.utils.atomic import atomic_write_json

    atomic_write_json(args.out / "shapes_eval.json", all_results)
    print(markdown_table(all_results))
    print(f"wrote {args.out / 'shapes_eval.json'} and the grids in {args.out}", file=sys.stderr)
    return 0
