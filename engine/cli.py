"""The `selfe` command. Each subcommand's implementation is imported only when it runs."""

from __future__ import annotations

import argparse
import sys


def _toy2d(argv_parser: argparse._SubParsersAction) -> None:
    from selfe.train.toy2d import cli as toy2d_cli

    p = argv_parser.add_parser(
        "toy2d",
        help="prove the objective and sampler: flow matching vs Self-E on 2-D data",
        description="Train flow matching and Self-E on a conditional 2-D mixture with the same "
        "objective code and budget; sample at several step counts; print the table.",
    )
    toy2d_cli.add_arguments(p)
    p.set_defaults(run=toy2d_cli.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="selfe", description="Self-E any-step text-to-image engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _toy2d(sub)
    cache = sub.add_parser("cache", help="precompute latents and text states into safetensors shards", add_help=False)
    cache.set_defaults(run=None)
    if argv and argv[0] == "cache":
        # `selfe cache` owns its own argument parser.
        from selfe.train.cache import cache_main

        return cache_main(argv[1:])
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
