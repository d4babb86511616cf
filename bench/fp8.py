"""FP8 against bf16 in the same run: throughput ratio and the denoiser output's relative error.

Helpers for bench/train_mfu.py, bench/sample_throughput.py and bench/fp8_sampling.py (FP8 sampling's image
quality over fixed seeds, per scaling, with a per-layer filter and a failing threshold; `from bench.fp8 import
compare_fp8`, with the repo root on sys.path), and a stand-alone script:

    python bench/fp8.py --preset tiny --resolution 64 --batch 2 --recipe torchao          # CPU smoke (emulated)
    python bench/fp8.py --preset 2b --resolution 512 --batch 16 --dtype bf16 --compile    # GPU: sampling + training

The baseline and the FP8 model hold the same weights (one is a converted deep copy of the other) and see
the same inputs, so the error is FP8's alone. On CPU torchao emulates the FP8 GEMM: the error is the real
one, the timing is not (emulation is slower than the baseline). The script prints a line per mode to stdout;
--json PATH writes the comparisons (a list of dicts, written whole or not at all). Arguments, the device and
the recipe's library are checked before any model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfe.components.fp8 import (
    FP8_RECIPES,
    TORCHAO_SCALINGS,
    FP8Config,
    converted_modules,
    fp8_autocast_context,
    fp8_copy,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, in float64), b the reference. Shapes must match; b must be non-zero."""
    if a.shape != b.shape:
        raise ValueError(f"relative_error needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.detach().double(), b.detach().double()
    denom = torch.linalg.vector_norm(b64).item()
    if denom == 0.0:
        raise ValueError("relative_error: the reference b is all zeros")
    return torch.linalg.vector_norm(a64 - b64).item() / denom


@dataclass
class FP8Comparison:
    """One FP8-vs-baseline measurement. Seconds are medians per call (forward, or forward + backward)."""

    recipe: str
    scaling: str
    mode: str  # "inference" or "training"
    baseline_seconds: float
    fp8_seconds: float
    relative_error: float  # of the FP8 model's output against the baseline's, same inputs and weights
    converted: int  # linears running in FP8

    @property
    def speedup(self) -> float:
        """Throughput ratio FP8 / baseline (> 1 means FP8 is faster)."""
        return self.baseline_seconds / self.fp8_seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}

    def summary(self) -> str:
        return (
            f"fp8={self.recipe}/{self.scaling} {self.mode}: {self.converted} linears, "
            f"{self.baseline_seconds * 1e3:.2f} ms -> {self.fp8_seconds * 1e3:.2f} ms "
            f"(x{self.speedup:.2f} throughput), relative error {self.relative_error:.3e}"
        )


def _call(model: nn.Module, inputs: Sequence[Any] | Mapping[str, Any]) -> Tensor:
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of `fn()` over `iters` calls after `warmup` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def default_loss(out: Tensor) -> Tensor:
    """A scalar to backpropagate when timing training steps (the value is irrelevant to the timing)."""
    return out.float().square().mean()


def compare_fp8(
    model_factory: Callable[[], nn.Module],
    inputs: Sequence[Any] | Mapping[str, Any],
    config: FP8Config,
    *,
    training: bool = False,
    warmup: int = 1,
    iters: int = 3,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    loss_fn: Callable[[Tensor], Tensor] = default_loss,
) -> FP8Comparison:
    """Build the baseline with `model_factory()`, an FP8 copy of it, and measure both on `inputs`.

    inputs: positional args (or kwargs) of the model's forward, e.g. `(x, t, s, cond)` for the MMDiT.
    training: time forward + backward of `loss_fn(output)` (FP8 via `convert_for_training`); else time a
    no-grad forward (`convert_for_inference`). wrap: applied to both models after conversion (e.g.
    `torch.compile`). The error is measured on one no-grad forward of each.
    """
    if config.recipe == "none":
        raise ValueError("compare_fp8 needs an FP8 recipe ('torchao' or 'te'), got recipe='none'")
    baseline = model_factory()
    fp8 = fp8_copy(baseline, config, training=training)
    converted = len(converted_modules(fp8))
    if wrap is not None:
        baseline, fp8 = wrap(baseline), wrap(fp8)
    device = next(baseline.parameters()).device

    def run(model: nn.Module, fp8_context: bool) -> Callable[[], Any]:
        def step() -> Any:
            with fp8_autocast_context(config) if fp8_context else contextlib.nullcontext():
                if not training:
                    with torch.no_grad():
                        return _call(model, inputs)
                loss_fn(_call(model, inputs)).backward()
                model.zero_grad(set_to_none=True)

        return step

    with torch.no_grad():
        reference = _call(baseline, inputs)
        with fp8_autocast_context(config):
            out = _call(fp8, inputs)
    error = relative_error(out, reference)
    baseline_seconds = median_seconds(run(baseline, False), device, warmup, iters)
    fp8_seconds = median_seconds(run(fp8, True), device, warmup, iters)
    return FP8Comparison(
        recipe=config.recipe,
        scaling=config.scaling,
        mode="training" if training else "inference",
        baseline_seconds=baseline_seconds,
        fp8_seconds=fp8_seconds,
        relative_error=error,
        converted=converted,
    )


def denoiser_inputs(
    model_config: Any,
    batch: int,
    resolution: int,
    txt_tokens: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Random MMDiT inputs (x, t, s, cond) for a `resolution`² image (latents 8x smaller, FLUX AE)."""
    if resolution % (8 * model_config.patch_size):
        raise ValueError(f"resolution {resolution} must be a multiple of {8 * model_config.patch_size}")
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    x = torch.randn(batch, model_config.in_channels, side, side, generator=g)
    t = torch.rand(batch, generator=g) * 0.8 + 0.1
    s = t * torch.rand(batch, generator=g)
    cond = {
        "txt": torch.randn(batch, txt_tokens, model_config.txt_dim, generator=g).to(device, dtype),
        "txt_mask": None,
        "pooled": torch.randn(batch, model_config.vec_dim, generator=g).to(device, dtype),
    }
    return x.to(device, dtype), t.to(device), s.to(device), cond


RECIPE_LIBRARIES = {"torchao": "torchao", "te": "transformer_engine"}  # selfe.utils.optional's names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from selfe.network.config import PRESETS, mmdit_preset
    from selfe.utils.atomic import folder_problem
    from selfe.utils.devices import device_problem
    from selfe.utils.optional import probe, unavailable_reason

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="MMDiT preset (default %(default)s)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="(default %(default)s)")
    parser.add_argument("--txt-tokens", type=int, default=None, help="default: 8 for tiny, 512 otherwise")
    parser.add_argument(
        "--recipe", choices=[r for r in FP8_RECIPES if r != "none"], default="torchao", help="(default %(default)s)"
    )
    parser.add_argument("--scaling", choices=TORCHAO_SCALINGS, default="tensorwise", help="(default %(default)s)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("inference", "training"),
        default=["inference", "training"],
        help="no-grad forward and/or forward + backward (default: both)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model (default %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per model, median (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: stdout only)")
    args = parser.parse_args(argv)
    # Checked here, before any model is built: a bad value should cost a second, not a traceback later.
    for name in ("resolution", "batch", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.txt_tokens is not None and args.txt_tokens < 1:  # 0 would silently mean the default
        parser.error(f"--txt-tokens must be >= 1, got {args.txt_tokens}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    multiple = 8 * mmdit_preset(args.preset).patch_size
    if args.resolution % multiple:
        parser.error(f"--resolution {args.resolution} must be a multiple of {multiple} for --preset {args.preset}")
    problem = device_problem(args.device)
    if problem:
        parser.error(problem)
    if args.json is not None:
        problem = "is a directory" if args.json.is_dir() else folder_problem(args.json.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    library = RECIPE_LIBRARIES[args.recipe]
    if not probe(library).available:
        parser.error(f"--recipe {args.recipe}: {unavailable_reason(library)}")
    return args


def main(argv: list[str] | None = None) -> list[FP8Comparison]:
    from selfe.network.config import mmdit_preset
    from selfe.network.model import MMDiT
    from selfe.utils.atomic import atomic_write_bytes

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_config = mmdit_preset(args.preset)
    txt_tokens = args.txt_tokens or (8 if args.preset == "tiny" else 512)
    inputs = denoiser_inputs(model_config, args.batch, args.resolution, txt_tokens, device, dtype)

    def factory() -> nn.Module:
        torch.manual_seed(0)
        model = MMDiT(model_config)
        with torch.no_grad():  # random weights everywhere: adaLN-Zero's zeros would hide every block
            for param in model.parameters():
                if param.dim() > 1 and not param.any():
                    nn.init.normal_(param, std=0.02)
        return model.to(device, dtype)

    fp8_config = FP8Config(recipe=args.recipe, scaling=args.scaling, fsdp_float8_all_gather=False)
    results = []
    for mode in args.modes:
        result = compare_fp8(
            factory,
            inputs,
            fp8_config,
            training=mode == "training",
            warmup=args.warmup,
            iters=args.iters,
            wrap=torch.compile if args.compile else None,
        )
        print(f"{args.preset} {args.resolution}px batch {args.batch} {dtype}: {result.summary()}")
        results.append(result)
    if args.json:  # temp file then rename: an interrupted run leaves no half-written JSON
        atomic_write_bytes(args.json, json.dumps([r.as_dict() for r in results], indent=2).encode())
    return results


if __name__ == "__main__":
    main()
