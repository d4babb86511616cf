"""The `selfe` command. Each subcommand's implementation is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from selfe import __version__

# Subcommands that own their argument parsers: name -> (module, function, one-line help).
DELEGATED = {
    "train": ("selfe.train.cli", "train_main", "train a Self-E model (FSDP2; under torchrun or plain python)"),
    "export": ("selfe.train.export", "export_main", "export a training checkpoint's EMA weights for sampling"),
    "generate": ("selfe.generate", "generate_main", "sample images from a trained model at any step counts"),
    "cache": ("selfe.train.cache_cli", "cache_main", "precompute latents and text states into safetensors shards"),
    "data": ("selfe.shapes.data", "data_main", "make a built-in data set (ShapesEval: `selfe data shapes`)"),
    "eval": ("selfe.shapes.evaluate", "eval_main", "evaluate a model (ShapesEval: `selfe eval shapes --model DIR`)"),
}


def _toy2d(subparsers: argparse._SubParsersAction) -> None:
    from selfe.train.toy2d import cli as toy2d_cli

    p = subparsers.add_parser(
        "toy2d",
        help="prove the objective and sampler: flow matching vs Self-E on 2-D data",
        description="Train flow matching and Self-E on a conditional 2-D mixture with the same "
        "objective code and budget; sample at several step counts; print the table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    toy2d_cli.add_arguments(p)
    p.set_defaults(run=toy2d_cli.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    parser = argparse.ArgumentParser(prog="selfe", description="Self-E any-step text-to-image engine")
    parser.add_argument("--version", action="version", version=f"selfe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _toy2d(sub)
    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
