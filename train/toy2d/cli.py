"""`selfe toy2d`: flow matching vs Self-E on a conditional 2-D mixture, sampled at 1, 2, 4, 8 and 50 steps."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from selfe.train.toy2d.data import RingMixture, load_npz, split_holdout
from selfe.train.toy2d.experiment import Toy2DConfig, run_experiment
from selfe.train.toy2d.report import markdown_table, write_results_json, write_sample_files, write_scatter_png
from selfe.utils.atomic import folder_problem

log = logging.getLogger("selfe.toy2d")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Toy2DConfig()
    parser.add_argument("--data", type=Path, help="your own data: .npz with x (N, 2) float and y (N,) int labels")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("selfe_toy2d"),
        help="output folder: results.json, toy2d.png and the samples {method}_{steps}.npz",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=list(defaults.steps), help="sampling step counts")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="training iterations per method")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--guidance", type=float, default=defaults.guidance, help="EP-CFG omega for both methods (0 or less: no CFG)"
    )
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="train the two methods in parallel processes (1: one after the other)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override any Toy2DConfig field, e.g. --set width=64 aux_start_fraction=none",
    )


class UsageError(SystemExit):
    """A bad argument: exit status 2. str() keeps the message (already printed by `_fail`) for callers that catch it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 2, as argparse does for the errors it catches itself."""
    print(f"selfe toy2d: error: {message}", file=sys.stderr)
    raise UsageError(message)


def _parse_override(config: Toy2DConfig, item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(config) if f.name != "data"}
    if not sep or key not in fields:
        _fail(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
    current = getattr(config, key)
    if raw.lower() == "none":
        if "None" not in str(fields[key].type):  # only the optional fields (`float | None`) take none
            _fail(f"--set {key}: needs a value, not none")
        return key, None
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            _fail(f"--set {key}: expected true or false, got {raw!r}")
        return key, raw.lower() in ("true", "1")
    try:
        if isinstance(current, tuple):
            return key, tuple(int(v) for v in raw.split(","))
        return key, (type(current)(raw) if current is not None else float(raw))
    except ValueError as err:
        _fail(f"--set {key}: {err}")


def config_from_args(args: argparse.Namespace) -> Toy2DConfig:
    # NaN would pass `> 0` as false and silently mean "no CFG"; inf would sample NaNs.
    if args.guidance is not None and not math.isfinite(args.guidance):
        _fail(f"--guidance must be a finite number, got {args.guidance}")
    try:
        config = Toy2DConfig(
            iterations=args.iterations,
            batch_size=args.batch_size,
            guidance=args.guidance if args.guidance is not None and args.guidance > 0 else None,
            steps=tuple(args.steps),
            eval_samples=args.eval_samples,
            seed=args.seed,
        )
        overrides = dict(_parse_override(config, item) for item in args.set)
        return dataclasses.replace(config, **overrides) if overrides else config
    except ValueError as err:  # Toy2DConfig's own checks (and those of the configs it builds)
        _fail(str(err))


def _check_args(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        _fail(f"--threads must be >= 1, got {args.threads}")
    if args.jobs < 1:
        _fail(f"--jobs must be >= 1, got {args.jobs}")
    problem = folder_problem(args.out)
    if problem:
        _fail(f"--out {args.out}: {problem}")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    # Every argument is checked (and --data read) before the first training step.
    config = config_from_args(args)
    _check_args(args)
    user_data = None
    if args.data is not None:
        try:
            user_data = load_npz(args.data)
        except (OSError, ValueError) as err:
            _fail(f"--data {err}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(config.seed + 100)
    if user_data is not None:
        x, y = user_data
        train, heldout = split_holdout(x, y, 0.2, gen)
        modes = None
        log.info(
            "user data %s: %d train / %d held-out points, %d labels",
            args.data,
            len(train[0]),
            len(heldout[0]),
            int(y.max()) + 1,
        )
    else:
        modes = config.data
        train = modes.sample(200_000, gen)
        heldout = modes.sample(config.eval_samples, gen)
    start = time.perf_counter()
    results = run_experiment(config, train, heldout, modes, jobs=args.jobs)
    results["seconds"] = time.perf_counter() - start
    results["data"] = str(args.data) if args.data else f"built-in {type(RingMixture()).__name__}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_results_json(results, args.out / "results.json")
    drew = write_scatter_png(results, heldout, args.out / "toy2d.png")
    write_sample_files(results, args.out)
    print(markdown_table(results))
    metric_note = (
        "precision = share of samples within 3 sigma of a mode of their own condition"
        if modes
        else "precision/recall = k-NN (k=5) estimates against held-out data"
    )
    print(f"\n{metric_note}; swd = sliced Wasserstein distance to held-out data (lower is better).")
    print(
        f"total {results['seconds']:.0f}s; wrote {args.out / 'results.json'}"
        + (f", {args.out / 'toy2d.png'}" if drew else " (no PNG: matplotlib not installed)")
        + f" and {args.out}/{{method}}_{{steps}}.npz"
    )
    return 0
