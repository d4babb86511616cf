"""The kernel backend switch: one name picks the implementation of every fused op.

Backends: `torch` (reference.py, runs anywhere), `triton`, `cuda`, and `auto` (torch on CPU; on
CUDA the fastest available per op and use, measured by bench/kernels.py). A name the caller gives (a
config field) wins; where the caller leaves it to `auto` (the config default) or None, the
SELFE_KERNEL_BACKEND environment variable decides. An implementation the user asked for by name that
cannot run raises; `auto` falls back quietly.

`auto` on CUDA picks per call, since the fastest forward kernel is not the fastest forward + backward:
- no gradient (sampling, the objective's self-evaluation passes): AUTO_PREFERENCE["forward"];
- a gradient, eager: AUTO_PREFERENCE["training"];
- a gradient under torch.compile: the reference, which inductor fuses with its neighbours (a custom op is
  a wall to that fusion).

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
# For `auto` on CUDA: per use, per op, fastest first. From bench/kernels.py on an H200 at the 2b shapes
# (bf16; bench/RESULTS.md, 2026-12-04): the Triton forwards beat the compiled reference 1.2-4x (CUDA C++
# within 5% of Triton). The training row is provisional: that run's forward + backward rows timed the
# host's autograd overhead more than the kernels (the timer has since been fixed), and it is to be taken
# again from the corrected table's eager entries.
AUTO_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "forward": {op: ("triton", "cuda", "torch") for op in OPS},
    "training": {
        "layer_norm_modulate": ("torch",),
        "gated_residual_modulate": ("cuda", "torch"),
        "qk_norm_rope": ("triton", "torch"),
        "energy_preserving_mix": ("torch",),
    },
}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if backend not in ("triton", "cuda"):
        raise ValueError(f"only 'triton' or 'cuda' implementations register, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY[op][backend] = fn
        clear_resolved()
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


# (op, backend, device type) -> implementation, filled on first request. Compiled code (the sampler's
# step calls the renorm op) only looks up here: dynamo cannot trace a provider's import.
_RESOLVED: dict[tuple[str, str, str], Callable] = {}


def get_op(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of `op` for `backend` on `device`; resolve it once outside compiled code."""
    name = resolve_backend(backend)
    key = (op, name, device.type)
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _RESOLVED[key] = _resolve(op, name, device)
    return impl


def clear_resolved() -> None:
    """Forget the resolved implementations (after a registry or preference change)."""
    _RESOLVED.clear()


def _resolve(op: str, name: str, device: torch.device) -> Callable:
    impls = _REGISTRY.get(op)
    if impls is None:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if name == "torch":
        return impls["torch"]
    if name == "auto":
        if device.type != "cuda":
            return impls["torch"]
        return _auto_op(op, AUTO_PREFERENCE["forward"][op], AUTO_PREFERENCE["training"][op])
    _load_provider(op, name)
    if name not in impls:
        raise RuntimeError(f"kernel backend {name!r} has no implementation of {op!r} in this install")
    return impls[name]


def _first_available(op: str, preference: tuple[str, ...]) -> Callable:
    impls = _REGISTRY[op]
    for candidate in preference:
        if candidate != "torch":
            try:
                _load_provider(op, candidate)
            except Exception:  # an auto-selected fast path that cannot load falls back quietly
                continue
        if candidate in impls:
            return impls[candidate]
    return impls["torch"]


def _auto_op(op: str, forward: tuple[str, ...], training: tuple[str, ...]) -> Callable:
    """`auto` on CUDA: the forward choice without a gradient, the training choice with one (the reference
    under torch.compile)."""
    reference_impl = _REGISTRY[op]["torch"]
    forward_impl, training_impl = _first_available(op, forward), _first_available(op, training)
    if forward_impl is training_impl is reference_impl:
        return reference_impl

    def by_use(*args, **kwargs):
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if not needs_grad:
            return forward_impl(*args, **kwargs)
        return reference_impl(*args, **kwargs) if torch.compiler.is_compiling() else training_impl(*args, **kwargs)

    by_use.__name__ = by_use.__qualname__ = f"{op}_auto"
    by_use.implementations = {"forward": forward_impl, "training": training_impl, "compiled_training": reference_impl}
    return by_use
