"""`selfe train CONFIG [key=value ...]`: CONFIG is a preset or a saved config.json.

Runs under torchrun (one process per GPU) and under plain python (world size 1):
    torchrun --nproc-per-node 8 -m selfe.train.cli 2b data.cache_dir=/data/cache run_dir=runs/2b
    selfe train smoke
Exit status 0 when the run finished or stopped on SIGTERM/SIGINT after checkpointing; 2 for a bad
config or a missing input (manifest, cache, autoencoder, text encoders); 3 when it aborted on a streak of
non-finite steps. A rank of a multi-process run ends with os._exit once its process group is destroyed and
its output flushed: gloo's worker threads can still be releasing the last collective's tensors when Python
finalises, and a thread that needs the GIL then aborts the process ("terminate called without an active
exception", seen about once in 15 two-rank runs on CPU). A rank that fails to start or dies on an uncaught error
exits the ordinary way, so that abort may still follow its error message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def train_main(argv: Sequence[str] | None = None) -> int:
    from selfe.train.config import PRESETS

    parser = argparse.ArgumentParser(prog="selfe train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help=f"preset name ({', '.join(PRESETS)}) or path to a config.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, checked against field types")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)  # flags may come between the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from selfe.train.config import resolve

    try:
        config = resolve(args.config, args.overrides)
    except (ValueError, TypeError) as err:
        print(f"selfe train: bad config: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a config.json that is missing or unreadable
        print(f"selfe train: cannot read config {args.config!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=1))
        return 0

    from selfe.train.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(config)
    except (FileNotFoundError, ValueError) as err:  # a missing input or a config the data contradicts
        print(f"selfe train: cannot start {config.name!r}: {err}{_setup_hint(config.name)}", file=sys.stderr)
        return 2
    result = None
    try:
        result = trainer.train()
    except NonFiniteLossError as err:
        print(f"selfe train: {err}", file=sys.stderr)
    finally:
        trainer.close()
    if result is not None and trainer.dist.rank == 0:
        how = "stopped by signal" if result.stopped_by_signal else "finished"
        print(f"selfe train: {how} at step {result.step} ({result.skipped} skipped); checkpoint {result.checkpoint}")
    return end_rank(trainer, 3 if result is None else 0)


def end_rank(trainer, code: int) -> int:
    """`code`, or for a rank of a multi-process run, exit now with it (see the module docstring)."""
    if trainer.dist.world_size == 1:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _setup_hint(name: str) -> str:
    if name.startswith("shapes-"):
        trained = " --autoencoder trained" if name.endswith("-ae") else ""
        return f" (the {name} preset reads `selfe data shapes{trained}`'s output in data/shapes: run that first)"
    return ""


if __name__ == "__main__":
    sys.exit(train_main())
