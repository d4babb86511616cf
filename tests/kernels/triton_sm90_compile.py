"""Compile every Triton kernel of selfe.kernels for sm_90 on a machine without a GPU (run as a script).

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that Triton's compiler takes
them: tl.dot shapes and dtypes, layouts, shared memory per config are only seen by the real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas). Here every op's forward and backward runs through its real
launcher, at the 2b shapes and at ragged ones, in each dtype, with three stand-ins:
- a driver that names an H100 (GPUTarget cuda 90) as the current device, so nothing asks for CUDA;
- Triton's jit_cache_hook, which records each launch's exact signature, constexprs and options and skips
  the launch (outputs stay uninitialised; nothing downstream reads them for their values);
- autotuned kernels launch once per config instead of timing them, and the launchers' CUDA-tensor checks
  are lifted (the tensors are CPU ones).
Every distinct compilation is then compiled for sm_90 (in parallel) and printed as one JSON line: kernel,
signature, constexprs, options, ok (compiled), shared (bytes), fits (within sm_90's shared memory), error.
Written against triton 3.7's runtime internals (knobs.runtime.jit_cache_hook and its keywords, Autotuner,
driver.set_active); exits 3 when they are missing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: this compiles for the GPU")

import torch
import triton
from triton.backends.compiler import GPUTarget

try:
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    knobs.runtime.jit_cache_hook  # noqa: B018
except (ImportError, AttributeError) as err:
    print(f"this triton lacks the runtime hooks the harness needs: {err}", file=sys.stderr)
    sys.exit(3)

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)


class AOTDriver:
    """Just enough of Triton's CUDA driver for the jit to pick a target and a device without a GPU."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


VARIANTS: dict[tuple, dict] = {}  # one entry per distinct compilation, in launch order


def record_instead_of_launch(*, key, fn, compile, **_):
    """jit_cache_hook: note this launch's compilation (signature, constexprs, attributes, options) and skip
    it and the launch; main() compiles every distinct one afterwards, in parallel."""
    # The hook's keywords in triton 3.7: key, repr, fn (module, name, jit_function), compile, is_manual_warmup,
    # already_compiled. The key holds the specialisation and the options: equal keys, equal compilations.
    kernel = fn.jit_function
    variant = {
        "module": kernel.fn.__module__,
        "kernel": kernel.__name__,
        "signature": compile["signature"],
        "constants": compile["constants"],
        "attrs": compile["configs"][0],
        "options": {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages")},
    }
    VARIANTS.setdefault((kernel.__name__, str(key)), variant)
    return True


def compile_variant(variant: dict) -> dict:
    """Compile one recorded variant for TARGET (in a worker process); its report as a plain dict."""
    import importlib

    jit = getattr(importlib.import_module(variant["module"]), variant["kernel"])
    jit = jit.fn if isinstance(jit, Autotuner) else jit  # an autotuned kernel wraps its JITFunction
    names = [p.name for p in jit.params]
    constexprs = {names[path[0]]: _plain(v) for path, v in variant["constants"].items()}
    report = {"kernel": variant["kernel"], "signature": variant["signature"], "constexprs": constexprs,
              **variant["options"]}  # fmt: skip
    began = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(jit, variant["signature"], variant["constants"], variant["attrs"])
        compiled = triton.compile(src, target=TARGET, options=variant["options"])
        report["shared"] = int(compiled.metadata.shared)
        report["ok"], report["fits"] = True, report["shared"] <= SMEM_LIMIT
    except Exception as err:  # noqa: BLE001 - every compiler failure is a finding, reported
        report.update(ok=False, fits=False, error=f"{type(err).__name__}: {str(err)[:2000]}")
    report["seconds"] = round(time.perf_counter() - began, 2)
    return report


def _plain(value):
    return value if isinstance(value, (int, float, bool, str)) or value is None else repr(value)


def every_config(self: Autotuner, *args, **kwargs):
    """Autotuner.run without timing: launch (that is, compile) once per config."""
    for config in self.configs:
        self.fn.run(*args, **kwargs, **config.all_kwargs())


def install_stand_ins() -> None:
    driver.set_active(AOTDriver(TARGET))
    knobs.runtime.jit_cache_hook = record_instead_of_launch
    Autotuner.run = every_config
    from selfe.kernels import modulation, qk_norm_rope, renorm, rope_attention

    for module, name in ((modulation, "_check_runnable"), (renorm, "_check_runnable"),
                         (qk_norm_rope, "check_kernel_device"), (rope_attention, "check_kernel_device")):  # fmt: skip
        setattr(module, name, lambda *tensors: None)


def fwd_bwd(fn, *inputs, **kwargs) -> None:
    """fn(*inputs) and its backward, for the inputs that are floating point (None passes through)."""
    leaves = [t if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.ones_like(o) for o in outs]
    torch.autograd.backward(outs, grads)


def run_ops(dtype: torch.dtype, shape: dict, masks: tuple[bool, ...]) -> None:
    from selfe.kernels import modulation, qk_norm_rope, renorm, rope_attention

    B, L, D, H, Dh = shape["B"], shape["L"], shape["D"], shape["H"], shape["Dh"]
    x, y = torch.randn(B, L, D, dtype=dtype), torch.randn(B, L, D, dtype=dtype)
    gate, shift, scale = (torch.randn(B, D, dtype=dtype) for _ in range(3))
    fwd_bwd(modulation.layer_norm_modulate, x, shift, scale)
    fwd_bwd(modulation.gated_residual_modulate, x, gate, y, shift, scale)
    p, q = torch.randn(B, *shape["latent"], dtype=dtype), torch.randn(B, *shape["latent"], dtype=dtype)
    fwd_bwd(renorm.energy_preserving_mix, p, q, torch.rand(B), torch.rand(B))
    qh, kh, vh = (torch.randn(B, H, L, Dh, dtype=dtype) for _ in range(3))
    wq, wk = torch.ones(Dh, dtype=dtype), torch.ones(Dh, dtype=dtype)
    cos, sin = torch.randn(L, Dh // 2), torch.randn(L, Dh // 2)
    fwd_bwd(qk_norm_rope.qk_norm_rope, qh, kh, wq, wk, cos, sin)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, : L // 8] = False  # padded text keys
    for masked in masks:
        fwd_bwd(rope_attention.rope_flash_attention, qh, kh, vh, cos, sin, mask if masked else None)


# The 2b model's shapes (head dim 128), ragged ones with the 0.5b model's head dim (64), and the widest head
# the attention kernel accepts (256).
SHAPES = {
    "2b": {"B": 1, "L": 1536, "D": 2048, "H": 16, "Dh": 128, "latent": (16, 64, 64)},
    "ragged": {"B": 2, "L": 77, "D": 1000, "H": 3, "Dh": 64, "latent": (3, 7, 11)},
    "wide": {"B": 1, "L": 200, "D": 3072, "H": 2, "Dh": 256, "latent": (16, 8, 8)},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    import argparse
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every = ",".join(f"{shape}:{dtype}" for shape in SHAPES for dtype in DTYPES)
    parser.add_argument("--cases", default=every, help=f"comma list of SHAPE:DTYPE (default all: {every})")
    parser.add_argument("--masks", default="both", choices=("both", "masked"), help="attention key masks")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    install_stand_ins()
    masks = (False, True) if args.masks == "both" else (True,)
    broken = 0
    for case in args.cases.split(","):
        shape_name, dtype_name = case.split(":")
        try:
            run_ops(DTYPES[dtype_name], SHAPES[shape_name], masks)
        except Exception:  # noqa: BLE001 - a launcher that breaks before its kernel is a finding too
            broken += 1
            print(json.dumps({"kernel": "<launcher>", "case": case, "ok": False,
                              "error": traceback.format_exc()[-3000:]}), flush=True)  # fmt: skip
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        reports = list(pool.map(compile_variant, VARIANTS.values()))
    for report in reports:
        print(json.dumps(report), flush=True)
    return 1 if broken or not all(r["ok"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
