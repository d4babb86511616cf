"""Encode and decode throughput of the FLUX.1 autoencoder with random weights.

    python bench/autoencoder.py                       # flux1, 512^2, bf16 on CUDA / fp32 on CPU
    python bench/autoencoder.py --config tiny --resolution 64 --batch 2 --iters 1 --json

Times `encode` (images -> latents, posterior mean) and `decode` (latents -> images) separately,
after warm-up, under inference mode. Reports images/s and peak memory per phase: on CUDA the
allocator's peak allocated and reserved bytes (reset before each phase); on CPU the process's
peak resident set size, which only grows, so the decode figure includes everything before it.
Prints a summary to stdout; --json writes every number (to stdout alone with no PATH), --json PATH to a
file, written whole or not at all. Arguments are checked before the model is built.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from selfe.components.autoencoder import AUTOENCODER_PRESETS, AutoEncoder
from selfe.utils.atomic import atomic_write_bytes, folder_problem
from selfe.utils.devices import device_problem

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(AUTOENCODER_PRESETS), default="flux1", help="(default %(default)s)")
    parser.add_argument(
        "--resolution", type=int, default=512, help="image height and width in pixels (default %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default %(default)s)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per phase (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per phase (default %(default)s)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available, else cpu"
    )
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--batch-chunk", type=int, default=None, help="encode/decode this many images at a time (default: all)"
    )
    parser.add_argument("--channels-last", action="store_true", help="weights and inputs in channels_last")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write JSON results (stdout if no PATH)",
    )
    args = parser.parse_args(argv)
    for name in ("resolution", "batch", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.batch_chunk is not None and args.batch_chunk < 1:
        parser.error("--batch-chunk must be >= 1")
    # Checked here, not after the run: a bad value should cost a second, not the whole measurement.
    factor = AUTOENCODER_PRESETS[args.config]().downsample_factor
    if args.resolution % factor:
        parser.error(f"--resolution {args.resolution} must be divisible by the downsample factor {factor}")
    if args.device != "auto" and (problem := device_problem(args.device)) is not None:
        parser.error(problem)
    if args.json not in (None, "-"):
        path = Path(args.json)
        problem = "is a directory" if path.is_dir() else folder_problem(path.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict[str, float]:
    mib = 2**20
    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / mib,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / mib,
        }
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / mib}


def time_phase(fn, arg: torch.Tensor, args: argparse.Namespace, device: torch.device, name: str) -> dict[str, float]:
    # stderr: stdout may be the JSON (--json with no PATH)
    print(f"# {name}: {args.warmup} warm-up + {args.iters} timed batches", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        fn(arg)
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        out = fn(arg)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.iters
    del out
    return {"seconds_per_batch": seconds, "images_per_s": args.batch / seconds, **_peak_memory(device)}


def run(args: argparse.Namespace) -> dict:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype != "auto"
        else torch.bfloat16
        if device.type == "cuda"
        else torch.float32
    )
    config = AUTOENCODER_PRESETS[args.config]()
    factor = config.downsample_factor

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoEncoder(config)
    model = model.to(dtype).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.rand(args.batch, config.in_channels, args.resolution, args.resolution, device=device)
    images = (images * 2 - 1).to(dtype).contiguous(memory_format=memory_format)
    side = args.resolution // factor
    latents = torch.randn(args.batch, config.z_channels, side, side, device=device, dtype=dtype)
    latents = latents.contiguous(memory_format=memory_format)

    with torch.inference_mode():
        encode = time_phase(lambda x: model.encode(x, batch_chunk=args.batch_chunk), images, args, device, "encode")
        decode = time_phase(lambda z: model.decode(z, batch_chunk=args.batch_chunk), latents, args, device, "decode")
    return {
        "bench": "autoencoder",
        "config": args.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "batch": args.batch,
        "batch_chunk": args.batch_chunk,
        "channels_last": args.channels_last,
        "warmup": args.warmup,
        "iters": args.iters,
        "encode": encode,
        "decode": decode,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json is not None:  # temp file then rename: an interrupted run leaves no half-written JSON
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
    if args.json != "-":
        print(
            f"autoencoder {result['config']} {result['resolution']}^2 batch {result['batch']} "
            f"{result['dtype']} on {result['device']}"
        )
        for phase in ("encode", "decode"):
            stats = result[phase]
            memory = ", ".join(f"{k} {v:.0f}" for k, v in stats.items() if k.endswith("_mib"))
            print(
                f"  {phase}: {stats['images_per_s']:.2f} images/s "
                f"({stats['seconds_per_batch']:.3f} s/batch), {memory}"
            )


if __name__ == "__main__":
    main()
