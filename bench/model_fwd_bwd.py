"""Forward + backward throughput of the MMDiT with random weights and inputs.

Prints image tokens/s, peak memory and MFU (analytical FLOPs from selfe.network.flops over the GPU's dense bf16
peak, `selfe.network.flops.device_peak_flops`: H100's where the device is not listed, or --peak-flops) to stdout;
MFU counts useful FLOPs (the real text tokens only: with --pad-fraction the padding is not work) and the
executed FLOPs (padding included) are shown apart as their useful share;
--json PATH writes every number (written whole or not at all). Arguments are checked before the model is
built. The defaults are the 2b model's on a GPU; on CPU use the smoke run. --profile-kernels N then profiles
one more step: where its device time goes (bench/kernel_profile.py).

    python bench/model_fwd_bwd.py --preset tiny --resolution 64 --txt-tokens 16 --batch 2 --iters 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` as a package from a checkout

from bench import kernel_profile  # noqa: E402
from selfe.network.config import PRESETS, mmdit_preset  # noqa: E402
from selfe.network.flops import device_peak_flops, forward_flops  # noqa: E402
from selfe.network.model import MMDiT  # noqa: E402
from selfe.utils.atomic import atomic_write_bytes, folder_problem  # noqa: E402
from selfe.utils.devices import device_problem  # noqa: E402

VAE_DOWNSAMPLE = 8  # FLUX autoencoder: 512 px -> 64 latent -> 32x32 = 1024 tokens with 2x2 patches
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2b", help="MMDiT preset (default %(default)s)")
    parser.add_argument(
        "--resolution", type=int, default=512, help="image side in pixels (square) (default %(default)s)"
    )
    parser.add_argument("--txt-tokens", type=int, default=512, help="(default %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="(default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--attention-backend", default="auto", help="(default %(default)s)")
    parser.add_argument("--kernel-backend", default="auto", help="(default %(default)s)")
    parser.add_argument(
        "--pad-fraction",
        type=float,
        default=0.0,
        help="fraction of text tokens masked as padding, in [0, 1) (default 0: no mask, the fast path)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps, averaged (default %(default)s)")
    parser.add_argument(
        "--peak-flops", type=float, default=None,
        help="device peak FLOP/s for MFU (default: the GPU's, selfe.network.flops)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument(
        "--profile-kernels",
        type=int,
        default=0,
        metavar="N",
        help="also profile one more step: the N longest kernels and the share of each kind (default 0: off)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: stdout only)")
    args = parser.parse_args(argv)
    # Checked before the model is built: a bad value should cost a second, not a traceback mid-run.
    for name in ("resolution", "txt_tokens", "batch", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "profile_kernels"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.pad_fraction < 1:  # also refuses nan
        parser.error(f"--pad-fraction must be in [0, 1), got {args.pad_fraction}")
    if args.peak_flops is not None and not (math.isfinite(args.peak_flops) and args.peak_flops > 0):
        parser.error(f"--peak-flops must be a finite number > 0, got {args.peak_flops}")
    try:
        config = mmdit_preset(args.preset, attention_backend=args.attention_backend, kernel_backend=args.kernel_backend)
    except ValueError as err:
        parser.error(str(err))
    if args.resolution % (VAE_DOWNSAMPLE * config.patch_size):
        parser.error(f"--resolution {args.resolution} must be a multiple of {VAE_DOWNSAMPLE * config.patch_size}")
    if args.device is not None and (problem := device_problem(args.device)):
        parser.error(problem)
    if args.json is not None:
        problem = "is a directory" if args.json.is_dir() else folder_problem(args.json.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = args.peak_flops or device_peak_flops(device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = mmdit_preset(args.preset, attention_backend=args.attention_backend, kernel_backend=args.kernel_backend)
    latent = args.resolution // VAE_DOWNSAMPLE
    img_tokens = (latent // config.patch_size) ** 2
    torch.manual_seed(args.seed)

    model = MMDiT(config).to(device=device, dtype=dtype)
    # adaLN-Zero makes every block the identity at init; random weights everywhere make the timing honest.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.validate_inputs = False
    if args.compile:
        for block in [*model.double_blocks, *model.single_blocks]:
            block.compile()

    b = args.batch
    x = torch.randn(b, config.in_channels, latent, latent, device=device, dtype=dtype)
    t = torch.rand(b, device=device)
    s = t * torch.rand(b, device=device)
    txt_mask, n_real = None, args.txt_tokens
    if args.pad_fraction > 0:
        n_real = max(1, round(args.txt_tokens * (1 - args.pad_fraction)))
        txt_mask = torch.arange(args.txt_tokens, device=device)[None, :].expand(b, -1) < n_real
    cond = {
        "txt": torch.randn(b, args.txt_tokens, config.txt_dim, device=device, dtype=dtype),
        "txt_mask": txt_mask,
        "pooled": torch.randn(b, config.vec_dim, device=device, dtype=dtype),
    }

    def step() -> None:
        out = model(x, t, s, cond)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    # progress on stderr, outside the timed loop (a 2b step on CPU takes minutes)
    print(f"# {args.warmup} warm-up + {args.iters} timed steps", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / args.iters
    else:
        seconds = (time.perf_counter() - t0) / args.iters

    flops = 3 * forward_flops(  # forward + backward
        config, img_tokens=img_tokens, txt_lengths=[n_real] * b, executed_txt_tokens=args.txt_tokens
    )
    result = {
        "preset": args.preset,
        "params": config.num_parameters(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "attention_backend": args.attention_backend,
        "kernel_backend": args.kernel_backend,
        "compile": args.compile,
        "batch": b,
        "resolution": args.resolution,
        "img_tokens": img_tokens,
        "txt_tokens": args.txt_tokens,
        "pad_fraction": args.pad_fraction,
        "iters": args.iters,
        "step_ms": seconds * 1e3,
        "img_tokens_per_s": b * img_tokens / seconds,
        "tokens_per_s": b * (img_tokens + args.txt_tokens) / seconds,
        "samples_per_s": b / seconds,
        "flops_per_step": flops.useful,
        "executed_flops_per_step": flops.executed,
        "useful_share": flops.useful_share,
        "tflops_per_s": flops.useful / seconds / 1e12,
        "peak_flops": peak,
        "mfu": flops.useful / seconds / peak,
        "executed_mfu": flops.executed / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "torch": torch.__version__,
    }
    memory = f"{result['peak_memory_gib']:.2f} GiB" if cuda else "n/a (CPU)"
    print(
        f"{args.preset} ({result['params'] / 1e6:.1f}M params) fwd+bwd, {result['dtype']}, "
        f"attn={args.attention_backend}, kernels={args.kernel_backend}, {'compiled' if args.compile else 'eager'}, "
        f"{result['device']}, MFU of useful FLOPs (real text only) over peak {peak / 1e12:.0f} TFLOP/s; executed "
        "FLOPs include the padding:\n"
    )
    print("| batch | img + txt tokens | step ms | img tokens/s | tokens/s | TFLOP/s | MFU | useful share | memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {b} | {img_tokens} + {args.txt_tokens} | {result['step_ms']:.2f} | {result['img_tokens_per_s']:.0f} | "
        f"{result['tokens_per_s']:.0f} | {result['tflops_per_s']:.2f} | {100 * result['mfu']:.1f}% | "
        f"{100 * result['useful_share']:.0f}% | {memory} |"
    )
    if args.profile_kernels:  # after the timing, so the profiler's overhead is in no figure above
        result["kernel_profile"] = kernel_profile.profile_call(step, device, args.profile_kernels)
        print("\n" + kernel_profile.markdown(result["kernel_profile"], "Profile, one fwd+bwd step"))
    if args.json:  # temp file then rename: an interrupted run leaves no half-written JSON
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
