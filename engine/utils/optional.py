"""The one place where optional GPU libraries are probed: torchao, Transformer Engine, flash-attn, nvtx.

A library counts as available only when importing it succeeds: a wheel that installed but cannot load
(a missing CUDA runtime, an ABI mismatch with this torch) shows up only at import, so `find_spec` is not
enough. Each probe runs once, on first call (never at import of this module), and caches the outcome
together with the import error's text, so an error raised for a library the user asked for by name can
say why it is missing. Nothing here makes a CUDA call.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from types import ModuleType

# Probe name -> the module imported to decide it (what the user installs may differ: transformer-engine[pytorch]).
OPTIONAL_MODULES: dict[str, str] = {
    "torchao": "torchao.float8",
    "transformer_engine": "transformer_engine.pytorch",
    "flash_attn": "flash_attn",
    "nvtx": "nvtx",
    "tensorboard": "torch.utils.tensorboard",
}

# Install hint per probe, for error messages.
INSTALL_HINTS: dict[str, str] = {
    "torchao": "pip install torchao (the `fp8` extra)",
    "transformer_engine": "pip install 'transformer-engine[pytorch]' on a CUDA machine (the `te` extra)",
    "flash_attn": "pip install flash-attn on a CUDA machine (the `flash` extra)",
    "nvtx": "pip install nvtx",
    "tensorboard": "pip install tensorboard",
}


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of trying to import one optional library."""

    name: str
    module: ModuleType | None
    error: str | None  # "ModuleNotFoundError: No module named 'x'" etc.; None when the import worked

    @property
    def available(self) -> bool:
        return self.module is not None


_results: dict[str, ProbeResult] = {}
_lock = threading.Lock()


def probe(name: str) -> ProbeResult:
    """Import the optional library `name` (a key of OPTIONAL_MODULES) once and cache the outcome."""
    if name not in OPTIONAL_MODULES:
        raise ValueError(f"unknown optional library {name!r}; known: {sorted(OPTIONAL_MODULES)}")
    with _lock:
        if name not in _results:
            try:
                module = importlib.import_module(OPTIONAL_MODULES[name])
                _results[name] = ProbeResult(name, module, None)
            except Exception as error:  # any import failure (not only ImportError) means unavailable
                _results[name] = ProbeResult(name, None, f"{type(error).__name__}: {error}")
        return _results[name]


def import_error(name: str) -> str | None:
    """Why `name` is not available (the import error's text), or None when it is."""
    return probe(name).error


def unavailable_reason(name: str) -> str:
    """One sentence for an error message or a pytest skip reason: what failed and how to install it."""
    result = probe(name)
    if result.available:
        return f"{name} is available"
    return f"{OPTIONAL_MODULES[name]} failed to import ({result.error}); {INSTALL_HINTS[name]}"


def require(name: str, purpose: str) -> ModuleType:
    """The imported module for `name`, or a RuntimeError naming `purpose` and the import error."""
    result = probe(name)
    if result.module is None:
        raise RuntimeError(f"{purpose} needs {name}, which is not available: {unavailable_reason(name)}")
    return result.module


def torchao_available() -> bool:
    """torchao with its float8 training module importable."""
    return probe("torchao").available


def transformer_engine_available() -> bool:
    """Transformer Engine's PyTorch modules importable (needs a CUDA build and runtime)."""
    return probe("transformer_engine").available


def flash_attn_available() -> bool:
    return probe("flash_attn").available


def nvtx_available() -> bool:
    """The standalone `nvtx` package (torch.cuda.nvtx needs no probe)."""
    return probe("nvtx").available


def clear_cache() -> None:
    """Forget every probe (tests that fake an import failure)."""
    with _lock:
        _results.clear()
