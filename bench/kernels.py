"""Fused-op benchmark: PyTorch eager and torch.compile'd references vs the Triton and CUDA C++ kernels.

Ops at the 2b model's shapes (B=4, L=512 text + 1024 image tokens, D=2048; the renorm on a (4, 16, 64, 64)
latent), forward and forward + backward. Each case is timed with CUDA events after a warm-up, median of
--iters runs, each queued behind a 1 GiB zero-fill (L2 flushed) and a GPU sleep longer than the host takes to
queue the op (so the events time the kernels: "ms"), inputs rotated over --buffers copies; "host ms" is that
host time (Python, dispatch, autograd, launches), which eager code pays when the GPU has nothing else queued.
Achieved GB/s counts the minimal bytes an op must move (each input read once, each output written once)
and is compared to the device's copy bandwidth, measured in the same run with a large `tensor.copy_`.
Markdown table to stdout; --json PATH writes the rows. The attention cases of
bench/kernels_attention_cases.py are added when that file exists (its `cases(args)` returns dicts
{"op", "impl", "fn", "bytes", "flops"}, as ours do).

Needs a CUDA device; without one it says so in one line and exits 2. `--cpu-smoke` instead runs every case
once or twice on tiny shapes (Triton through the interpreter, wall-clock timer; it replaces the shape,
--warmup, --iters and --buffers options) to check that the harness itself works:

    python bench/kernels.py                     # H100/H200: the real numbers
    python bench/kernels.py --cpu-smoke         # CPU: harness check only, the numbers mean nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE = {
    "batch": 2,
    "txt_tokens": 5,
    "img_tokens": 8,
    "dim": 48,
    "heads": 2,
    "head_dim": 16,
    "latent": (4, 6, 6),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="(default %(default)s)")
    parser.add_argument("--txt-tokens", type=int, default=512, help="(default %(default)s)")
    parser.add_argument("--img-tokens", type=int, default=1024, help="(default %(default)s)")
    parser.add_argument("--dim", type=int, default=2048, help="model width D of the modulation ops (default 2048)")
    parser.add_argument("--heads", type=int, default=16, help="(attention cases; default %(default)s)")
    parser.add_argument("--head-dim", type=int, default=128, help="(attention cases; default %(default)s)")
    parser.add_argument(
        "--pad-fraction", type=float, default=None, help="(attention cases) masked text share in [0, 1) (default 0.25)"
    )
    parser.add_argument(
        "--latent", type=int, nargs=3, default=(16, 64, 64), help="C H W of the renorm input (default 16 64 64)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="(default %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs per case (default %(default)s)")
    parser.add_argument("--iters", type=int, default=100, help="timed runs per case, median (default %(default)s)")
    parser.add_argument(
        "--buffers", type=int, default=4, help="input copies rotated between runs (L2 misses) (default %(default)s)"
    )
    parser.add_argument("--only", default=None, help="run only ops whose name contains this string")
    parser.add_argument("--no-attention", action="store_true", help="skip bench/kernels_attention_cases.py")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (default: stdout only)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the harness only")
    args = parser.parse_args(argv)
    # Checked before any tensor is made: a bad value should cost a second, not a traceback mid-run.
    counts = ("batch", "txt_tokens", "img_tokens", "dim", "heads", "head_dim", "iters", "buffers")
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.latent) < 1:
        parser.error(f"--latent sizes must be >= 1, got {' '.join(map(str, args.latent))}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.pad_fraction is not None and not 0 <= args.pad_fraction < 1:  # also refuses nan
        parser.error(f"--pad-fraction must be in [0, 1), got {args.pad_fraction}")
    if args.json is not None:
        from selfe.utils.atomic import folder_problem

        problem = "is a directory" if args.json.is_dir() else folder_problem(args.json.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    if args.cpu_smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.warmup, args.iters, args.buffers, args.device = 1, 2, 2, "cpu"
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (none here); nothing measured. --cpu-smoke checks the harness on CPU")
    else:
        args.device = "cuda"
    return args


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


FLUSH_BYTES = 1 << 30
COVER_MARGIN = 1.5  # the GPU sleeps this many times the host's queuing time of fn before fn's kernels run
MAX_COVER_S = 0.05  # a fn that waits on the GPU inside (a sync) can't be covered; don't sleep for nothing
HOST_RUNS = 5


@dataclass(frozen=True)
class Timing:
    """Median seconds of one call: `kernel_s` on the device (events; host time hidden), `host_s` the
    host's time to queue it (Python, dispatch, autograd, launches). On CPU both are the wall clock."""

    kernel_s: float
    host_s: float


def sleep_cycles_per_second(device: torch.device) -> float:
    """Rate of `torch.cuda._sleep`, which spins on the SM clock: measured, since boost clocks vary."""
    cycles = 1 << 22
    torch.cuda._sleep(cycles)  # first launch pays module loading
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize(device)
    return cycles / (start.elapsed_time(end) / 1e3)


def cover_cycles(host_s: float, cycles_per_s: float) -> int:
    """Cycles the GPU should sleep before each timed call so the host has queued all of it by then."""
    return int(min(COVER_MARGIN * host_s, MAX_COVER_S) * cycles_per_s)


def host_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Median host time to queue fn, measured with the GPU idle (so no launch waits on a full queue)."""
    times = []
    for _ in range(HOST_RUNS):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def time_fn(
    fn: Callable[[], Any], warmup: int, iters: int, device: torch.device, cycles_per_s: float | None = None
) -> Timing:
    """Median kernel and host seconds of fn over iters runs after warmup runs (CUDA events on GPU, wall clock
    on CPU).

    Each timed call is queued behind a 1 GiB zero-fill (L2 flushed) and a GPU sleep longer than the host's
    queuing time of fn, so the events time fn's kernels, not the Python, autograd and launch overhead
    around them: an op's backward queued through autograd takes the host far longer than the ~0.3 ms the
    zero-fill alone covers. The host time is reported apart (eager training and sampling pay it unless the
    GPU has other work queued; a CUDA graph does not)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        wall = statistics.median(times)
        return Timing(wall, wall)
    host_s = host_seconds(fn, device)
    sleep = cover_cycles(host_s, cycles_per_s or sleep_cycles_per_second(device))
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        flush.zero_()
        if sleep:
            torch.cuda._sleep(sleep)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    del flush
    return Timing(statistics.median(start.elapsed_time(end) for start, end in events) / 1e3, host_s)


def copy_bandwidth(device: torch.device, warmup: int, iters: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), the roofline for these ops."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / time_fn(lambda: dst.copy_(src), warmup, iters, device).kernel_s


# ---------------------------------------------------------------------------------------------------
# Cases: dicts {"op", "impl", "fn": zero-arg callable, "bytes": int | None, "flops": int | None}
# ---------------------------------------------------------------------------------------------------


def implementations(op: str, device: torch.device) -> list[tuple[str, Callable]]:
    """(impl name, fn) for every implementation of `op` that can run here."""
    from selfe.kernels import dispatch, reference

    ref = getattr(reference, op)
    impls = [("torch-eager", ref), ("torch-compile", torch.compile(ref, dynamic=False))]
    for backend in ("triton", "cuda") if device.type == "cuda" else ("triton",):  # cuda ops take CUDA tensors
        try:
            impls.append((backend, dispatch.get_op(op, backend, device)))
        except (ImportError, RuntimeError) as err:
            print(f"# {op}: no {backend} implementation here ({str(err).splitlines()[0]})", file=sys.stderr)
    return impls


def _rotating(inputs: list[tuple[torch.Tensor, ...]]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A callable returning the next input set, round robin (so consecutive runs miss in L2)."""
    state = {"i": 0}

    def next_inputs() -> tuple[torch.Tensor, ...]:
        state["i"] = (state["i"] + 1) % len(inputs)
        return inputs[state["i"]]

    return next_inputs


def op_cases(
    op: str,
    make_inputs: Callable[[], tuple[torch.Tensor, ...]],
    make_grads: Callable[[], tuple[torch.Tensor, ...]],
    fwd_bytes: int,
    bwd_bytes: int,
    args: argparse.Namespace,
) -> list[dict]:
    """fwd and fwd+bwd cases of every implementation of `op`; inputs with requires_grad get grads."""
    device = torch.device(args.device)
    sets = [make_inputs() for _ in range(args.buffers)]
    grads = [make_grads() for _ in range(args.buffers)]
    next_inputs, next_grads = _rotating(sets), _rotating(grads)
    cases = []
    for impl, fn in implementations(op, device):

        def forward(fn=fn):
            with torch.no_grad():
                return fn(*next_inputs())

        def forward_backward(fn=fn):
            inputs = next_inputs()
            outs = fn(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            return torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], next_grads())

        cases.append({"op": f"{op}.fwd", "impl": impl, "fn": forward, "bytes": fwd_bytes, "flops": None})
        cases.append(
            {
                "op": f"{op}.fwd+bwd",
                "impl": impl,
                "fn": forward_backward,
                "bytes": fwd_bytes + bwd_bytes,
                "flops": None,
            }
        )
    return cases


def fused_op_cases(args: argparse.Namespace) -> list[dict]:
    """layer_norm_modulate, gated_residual_modulate, energy_preserving_mix at the configured shapes."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    B, L, D = args.batch, args.txt_tokens + args.img_tokens, args.dim
    es = torch.finfo(dtype).bits // 8

    def randn(*shape: int, grad: bool = True, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype).requires_grad_(grad)

    tokens, cond = B * L * D * es, B * D * es
    cases = op_cases(
        "layer_norm_modulate",
        lambda: (randn(B, L, D), randn(B, D, std=0.1), randn(B, D, std=0.1)),
        lambda: (randn(B, L, D, grad=False),),
        fwd_bytes=2 * tokens + 2 * cond,  # read x, write out
        bwd_bytes=3 * tokens + 4 * cond,  # read x, d(out); write dx (+ dshift, dscale)
        args=args,
    )
    cases += op_cases(
        "gated_residual_modulate",
        lambda: (
            randn(B, L, D),
            randn(B, D, std=0.1),
            randn(B, L, D),
            randn(B, D, std=0.1),
            randn(B, D, std=0.1),
        ),
        lambda: (randn(B, L, D, grad=False), randn(B, L, D, grad=False)),
        fwd_bytes=4 * tokens + 3 * cond,  # read x, y; write x', out
        bwd_bytes=6 * tokens + 6 * cond,  # read x', y, d(x'), d(out); write dx, dy
        args=args,
    )
    C, H, W = args.latent
    latent = B * C * H * W * es

    def coefficients() -> tuple[torch.Tensor, torch.Tensor]:
        omega = torch.full((B,), 5.0, device=device, requires_grad=True)  # the sampler's CFG scale
        return omega, (1 - omega).detach().requires_grad_()

    cases += op_cases(
        "energy_preserving_mix",
        lambda: (randn(B, C, H, W), randn(B, C, H, W), *coefficients()),
        lambda: (randn(B, C, H, W, grad=False),),
        fwd_bytes=3 * latent,  # read p, q; write out (the two-phase kernels read p, q twice)
        bwd_bytes=5 * latent,  # read p, q, d(out); write dp, dq
        args=args,
    )
    return cases


def attention_cases(args: argparse.Namespace) -> list[dict]:
    """Cases from bench/kernels_attention_cases.py when that file exists (optional)."""
    path = Path(__file__).with_name("kernels_attention_cases.py")
    if args.no_attention or not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("selfe_bench_attention_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.cases(args))


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cases = fused_op_cases(args) + attention_cases(args)
    if args.only:
        ops = sorted({c["op"] for c in cases})
        cases = [c for c in cases if args.only in c["op"]]
        if not cases:  # before the copy bandwidth is measured: an empty table is no result
            print(f"kernels.py: error: --only {args.only!r} matches no op; ops: {', '.join(ops)}", file=sys.stderr)
            raise SystemExit(2)
    copy_bw = copy_bandwidth(device, args.warmup, args.iters)
    cycles_per_s = sleep_cycles_per_second(device) if device.type == "cuda" else None
    rows = []
    for i, case in enumerate(cases, 1):
        timing = time_fn(case["fn"], args.warmup, args.iters, device, cycles_per_s)
        seconds = timing.kernel_s
        # progress on stderr: stdout is the table
        print(
            f"# {i}/{len(cases)} {case['op']} {case['impl']}: {seconds * 1e3:.4f} ms (host {timing.host_s * 1e3:.4f})",
            file=sys.stderr,
            flush=True,
        )
        row = {"op": case["op"], "impl": case["impl"], "ms": seconds * 1e3, "host ms": timing.host_s * 1e3}
        if case.get("bytes"):
            row["GB/s"] = case["bytes"] / seconds / 1e9
            row["% copy BW"] = 100 * case["bytes"] / seconds / copy_bw
        if case.get("flops"):
            row["TFLOP/s"] = case["flops"] / seconds / 1e12
        rows.append(row)
    eager = {r["op"]: r["ms"] for r in rows if r["impl"] == "torch-eager"}
    for row in rows:
        if row["op"] in eager:
            row["x eager"] = eager[row["op"]] / row["ms"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "shapes": {
            "B": args.batch,
            "L": args.txt_tokens + args.img_tokens,
            "D": args.dim,
            "latent": list(args.latent),
        },
        "copy_GB/s": copy_bw / 1e9,
        "rows": rows,
        "fastest_fwd": fastest(rows, ".fwd"),
        "fastest_fwd_bwd": fastest(rows, ".fwd+bwd"),
    }


def fastest(rows: list[dict], suffix: str) -> dict[str, list[str]]:
    """Per op, implementations from fastest to slowest on the rows ending in `suffix` (".fwd": input for
    dispatch.AUTO_PREFERENCE["forward"]; ".fwd+bwd": for its "training" table, the eager entries)."""
    by_op: dict[str, list[tuple[float, str]]] = {}
    for row in rows:
        if row["op"].endswith(suffix):
            by_op.setdefault(row["op"].removesuffix(suffix), []).append((row["ms"], row["impl"]))
    return {op: [impl for _, impl in sorted(entries)] for op, entries in by_op.items()}


FORMATS = {
    "ms": "{:.4f}",
    "host ms": "{:.4f}",
    "GB/s": "{:.0f}",
    "% copy BW": "{:.0f}%",
    "TFLOP/s": "{:.1f}",
    "x eager": "{:.2f}",
}


def markdown(result: dict) -> str:
    columns = ["op", "impl", *FORMATS]
    lines = [
        f"Device: {result['device']}, torch {result['torch']}, {result['dtype']}, shapes {result['shapes']}; "
        f"copy bandwidth {result['copy_GB/s']:.0f} GB/s",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in result["rows"]:
        cells = [row["op"], row["impl"]]
        for col, fmt in FORMATS.items():
            cells.append(fmt.format(row[col]) if col in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Fastest fwd first: " + json.dumps(result["fastest_fwd"])]
    lines += ["", "Fastest fwd+bwd first: " + json.dumps(result["fastest_fwd_bwd"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from selfe.utils.atomic import atomic_write_bytes

    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
        torch.manual_seed(args.seed)
    result = run(args)
    print(markdown(result))
    if args.json is not None:  # temp file then rename: an interrupted run leaves no half-written JSON
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
