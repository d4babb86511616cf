"""The kernel backend switch: one name picks the implementation of every fused op.

Backends: `torch` (reference.py, runs anywhere), `triton`, `cuda`, and `auto` (torch on CPU; on
CUDA the fastest available per op). A name the caller gives (a config field) wins; where the caller
leaves it to `auto` (the config default) or None, the SELFE_KERNEL_BACKEND environment variable
decides. An implementation the user asked for by name that cannot run raises; `auto` falls back quietly.

Each op's provider module is imported on its own, on first request, so one module that cannot load
(a missing extension, a Triton feature an old version lacks) costs only the ops it provides.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from selfe.kernels import reference

BACKENDS = ("torch", "triton", "cuda", "auto")
ENV_VAR = "SELFE_KERNEL_BACKEND"

OPS = ("layer_norm_modulate", "gated_residual_modulate", "qk_norm_rope", "energy_preserving_mix")

# op -> backend -> implementation. Fast backends register here when their module is imported.
_REGISTRY: dict[str, dict[str, Callable]] = {op: {"torch": getattr(reference, op)} for op in OPS}
# backend -> op -> the module that registers it (by importing it); imported on first request only.
_PROVIDERS: dict[str, dict[str, str]] = {
    "triton": {
        "layer_norm_modulate": "selfe.kernels.modulation",
        "gated_residual_modulate": "selfe.kernels.modulation",
        "qk_norm_rope": "selfe.kernels.qk_norm_rope",
        "energy_preserving_mix": "selfe.kernels.renorm",
    },
    "cuda": {
        "layer_norm_modulate": "selfe.kernels.cuda_ops",
        "gated_residual_modulate": "selfe.kernels.cuda_ops",
        "energy_preserving_mix": "selfe.kernels.cuda_ops",
    },
}
# For `auto` on CUDA: preference order per op, fastest first (set from bench/kernels.py results).
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {op: ("torch",) for op in OPS}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if backend not in ("triton", "cuda"):
        raise ValueError(f"only 'triton' or 'cuda' implementations register, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY[op][backend] = fn
        return fn

    return wrap


def resolve_backend(backend: str | None = None) -> str:
    """The backend named by the argument; for None or `auto`, the environment's, else `auto`; validated."""
    name = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r} (from {ENV_VAR} or config)")
    return name


def _load_provider(op: str, backend: str) -> None:
    """Import the module that registers `op` for `backend`, if any; its import error propagates."""
    module = _PROVIDERS.get(backend, {}).get(op)
    if module is not None:
        importlib.import_module(module)


def get_op(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of `op` for `backend` on `device`."""
    name = resolve_backend(backend)
    impls = _REGISTRY.get(op)
    if impls is None:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if name == "torch":
        return impls["torch"]
    if name == "auto":
        if device.type != "cuda":
            return impls["torch"]
        for candidate in AUTO_PREFERENCE[op]:
            if candidate != "torch":
                try:
                    _load_provider(op, candidate)
                except Exception:  # an auto-selected fast path that cannot load falls back quietly
                    continue
            if candidate in impls:
                return impls[candidate]
        return impls["torch"]
    _load_provider(op, name)
    if name not in impls:
        raise RuntimeError(f"kernel backend {name!r} has no implementation of {op!r} in this install")
    return impls[name]
