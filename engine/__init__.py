"""selfe: an engine for training and sampling Self-E any-step text-to-image models.

engine/ installs as `selfe`, kernels/ as `selfe.kernels`, train/ as `selfe.train`.
Public names load lazily so `import selfe.kernels` stays light and import order never cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

from selfe.checkout import install_kernels_finder

__version__ = "0.1.0"

# In a source checkout the bare name `kernels` would find our kernels/ folder (or bench/kernels.py) before the
# installed `kernels` package that transformers imports; see selfe.checkout.
install_kernels_finder()

_EXPORTS = {
    "MMDiTConfig": "selfe.config",
    "MMDiT": "selfe.model",
    "SelfELoss": "selfe.objective",
    "ObjectiveConfig": "selfe.objective",
    "SamplerConfig": "selfe.sampler",
    "sample": "selfe.sampler",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
