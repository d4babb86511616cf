"""Compile time of the denoiser's forward with each block as a nested compile region, and without.

torch.compile of the whole model (fullgraph, as the sampler's step), each setting in a fresh process with a
fresh inductor cache, so neither run reuses the other's kernels: the first call's seconds (trace + compile +
run), then the steady per-call time and the largest difference from the eager output. The sampler's
`FastPathConfig.compile_regions` is this switch (`MMDiT.compile_regions`).

    python bench/compile_time.py --preset 2b --resolution 512 --batch 2          # GPU, bf16
    python bench/compile_time.py --preset tiny --depth 6 12 --resolution 32      # CPU (inductor's C++)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfe.network.config import PRESETS, mmdit_preset
from selfe.utils.atomic import atomic_write_bytes, folder_problem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2b", help="(default %(default)s)")
    parser.add_argument("--depth", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                        help="override the preset's block counts")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=512, help="latent side = resolution / 8 (default 512)")
    parser.add_argument("--txt-tokens", type=int, default=64, help="(default %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="(default %(default)s: batch 1 with CFG)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="steady calls timed after the first (default 10)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--one", choices=("on", "off"), default=None, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args(argv)
    for name in ("resolution", "txt_tokens", "batch", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resolution % 16:
        parser.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.depth is not None and (min(args.depth) < 0 or sum(args.depth) == 0):
        parser.error(f"--depth needs counts >= 0 and at least one block, got {' '.join(map(str, args.depth))}")
    if args.json is not None and (
        problem := "is a directory" if args.json.is_dir() else folder_problem(args.json.parent)
    ):
        parser.error(f"--json {args.json}: {problem}")
    return args


def measure(args: argparse.Namespace, regions: bool) -> dict:
    """One setting, in this process: the first call's seconds, the steady ms per call, the error."""
    from selfe.network.model import MMDiT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = mmdit_preset(args.preset)
    if args.depth is not None:
        config = dataclasses.replace(config, depth_double=args.depth[0], depth_single=args.depth[1])
    torch.manual_seed(0)
    with torch.device(device):
        net = MMDiT(config).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():  # adaLN-Zero zeros the gates: random everywhere so every block does work
        for param in net.parameters():
            param.normal_(0, 0.02)
    net.compile_regions = regions
    b, side = args.batch, args.resolution // 8
    x = torch.randn(b, config.in_channels, side, side, device=device, dtype=dtype)
    t = torch.full((b,), 0.7, device=device)
    cond = {
        "txt": torch.randn(b, args.txt_tokens, config.txt_dim, device=device, dtype=dtype),
        "txt_mask": torch.arange(args.txt_tokens, device=device)[None].expand(b, -1) < args.txt_tokens // 2,
        "pooled": torch.randn(b, config.vec_dim, device=device, dtype=dtype),
    }
    with torch.no_grad():
        reference = net(x, t, 0.5 * t, cond)
        step = torch.compile(lambda: net(x, t, 0.5 * t, cond, validate=False), backend=args.backend, fullgraph=True)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        out = step()
        sync()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
    return {
        "regions": regions,
        "first_call_s": first,
        "call_ms": (time.perf_counter() - start) / args.iters * 1e3,
        "max_abs_diff": float((out.float() - reference.float()).abs().max()),
        "blocks": config.depth_double + config.depth_single,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one is not None:  # a child: one setting, its JSON on stdout's last line
        print(json.dumps(measure(args, args.one == "on")))
        return {}
    child_argv = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for setting in ("off", "on"):
        with tempfile.TemporaryDirectory(prefix="selfe-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
            print(
                f"# compiling with regions {setting} (a fresh process and inductor cache)", file=sys.stderr, flush=True
            )
            done = subprocess.run(
                [sys.executable, __file__, *child_argv, "--one", setting], env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"compile_time.py: the run with regions {setting} failed (exit {done.returncode})")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    off, on = rows
    print(
        f"{args.preset} ({on['blocks']} blocks), batch {args.batch}, {args.resolution}², {args.txt_tokens} text "
        f"tokens, {on['dtype']}, {on['device']}, backend {args.backend}, torch {torch.__version__}:\n"
    )
    print("| blocks as nested regions | first call s | steady ms / call | max abs diff vs eager |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {'on' if row['regions'] else 'off'} | {row['first_call_s']:.1f} | {row['call_ms']:.2f} | "
            f"{row['max_abs_diff']:.1e} |"
        )
    print(f"\nfirst call: x{off['first_call_s'] / on['first_call_s']:.2f} faster with regions")
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    if args.json is not None:
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
