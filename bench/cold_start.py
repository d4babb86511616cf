"""Cold start: seconds to the first image of a fresh process, with an empty and with a warm compile cache.

Two fresh processes, each with its own empty inductor cache (so only selfe's compile cache carries work
over): the first ("cold") finds the compile cache empty, warms up the shape and saves the artifacts
(`SelfEPipeline.warmup`, selfe.sampling.compile_cache); the second ("warm") loads them first. Each reports
seconds from its start (imports included) to the first image, split into load / warmup / call, and
inductor's graph-cache hits and misses. Issue 29's target: <= 60 s cold, <= 15 s warm for a 2-step 2b image.

    python bench/cold_start.py --model exports/selfe-2b --resolution 512 --steps 2      # GPU, bf16
    python bench/cold_start.py --resolution 32 --parts step                            # CPU, shipped model

On a CPU the artifacts hold inductor's generated C++ source, not its built libraries, so the warm process
still builds them: the counters show the saved lowering, the seconds much less than on a GPU (where the
Triton kernels travel inside the artifacts).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: a fresh process pays them too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="pipeline directory (default: the shipped model)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--steps", type=int, default=2, help="(default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="(default %(default)s)")
    parser.add_argument("--parts", choices=("step", "all"), default="all",
                        help="compile the step, or the encoders and decoder too (default %(default)s)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--one", choices=("cold", "warm"), default=None, help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)  # the child's compile cache
    args = parser.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution is not None and args.resolution < 1:
        parser.error(f"--resolution must be >= 1, got {args.resolution}")
    if args.model is not None and not args.model.is_dir():
        parser.error(f"--model {args.model} is not a directory")
    return args


def measure(args: argparse.Namespace, cache: Path) -> dict:
    """In this (fresh) process: load, warm up, first image; seconds since the process started."""
    import torch
    from torch._dynamo.utils import counters

    from selfe import SelfEPipeline, shipped_model_dir
    from selfe.sampling.fast_path import FastPathConfig

    imported = time.perf_counter() - STARTED
    parts = args.parts == "all"
    config = FastPathConfig(
        compile=True, compile_text_encoder=parts, compile_decoder=parts, compile_cache=True, compile_cache_dir=cache
    )
    pipe = SelfEPipeline.from_pretrained(args.model or shipped_model_dir(), fast_path=config)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    loaded = time.perf_counter() - STARTED
    side = args.resolution or pipe.default_size[0]
    pipe.warmup(args.batch, side, side)
    warm = time.perf_counter() - STARTED
    pipe(["a photo of a cat"] * args.batch, steps=args.steps, height=side, width=side, seed=0, output_type="pt")
    sync()
    first_image = time.perf_counter() - STARTED
    load = pipe.components.cache_load
    return {
        "import_s": imported,
        "load_s": loaded - imported,
        "warmup_s": warm - loaded,
        "call_s": first_image - warm,
        "first_image_s": first_image,
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "artifacts_loaded": sum(load.artifacts.values()) if load is not None else 0,
        "device": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu",
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "resolution": side,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one is not None:  # a child: its JSON on stdout's last line
        print(json.dumps(measure(args, args.cache)))
        return {}
    child_argv = list(argv if argv is not None else sys.argv[1:])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="selfe-cold-start-") as scratch:
        cache = Path(scratch) / "compile-cache"  # empty for the cold process, warm for the second
        for run in ("cold", "warm"):
            inductor = Path(scratch) / f"inductor-{run}"  # never shared: only selfe's cache carries over
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "TRITON_CACHE_DIR": str(inductor)}
            print(f"# {run} process", file=sys.stderr, flush=True)
            child = [sys.executable, __file__, *child_argv, "--cache", str(cache), "--one", run]
            done = subprocess.run(child, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"cold_start.py: the {run} process failed (exit {done.returncode})")
            rows[run] = json.loads(done.stdout.strip().splitlines()[-1])
    cold = rows["cold"]
    print(
        f"first {args.steps}-step image, batch {args.batch}, {cold['resolution']}², parts {args.parts}, "
        f"{cold['dtype']}, {cold['device']}, torch {cold['torch']}:\n"
    )
    print("| process | first image s | import | load | warmup | call | fxgraph hit / miss | artifacts loaded |")
    print("|---|---|---|---|---|---|---|---|")
    for run, row in rows.items():
        print(
            f"| {run} | {row['first_image_s']:.1f} | {row['import_s']:.1f} | {row['load_s']:.1f} | "
            f"{row['warmup_s']:.1f} | {row['call_s']:.1f} | {row['fxgraph_cache_hit']} / "
            f"{row['fxgraph_cache_miss']} | {row['artifacts_loaded']} |"
        )
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    if args.json is not None:
        from selfe.utils.atomic import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
