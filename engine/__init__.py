"""selfe: an engine for training and sampling Self-E any-step text-to-image models.

engine/ installs as `selfe`, kernels/ as `selfe.kernels`, train/ as `selfe.train`. The engine's rooms: utils,
network, components, method, sampling, shapes (docs/architecture.md).
Public names load lazily so `import selfe.kernels` stays light and import order never cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

from selfe.utils.checkout import install_kernels_finder

__version__ = "0.1.0"

# In a source checkout the bare name `kernels` would find our kernels/ folder (or bench/kernels.py) before the
# installed `kernels` package that transformers imports; see selfe.utils.checkout.
install_kernels_finder()

# Every public name, importable as `from selfe import X`; the room it lives in is in docs/architecture.md.
_EXPORTS = {
    # the network
    "MMDiTConfig": "selfe.network.config",
    "mmdit_preset": "selfe.network.config",
    "MMDiT": "selfe.network.model",
    # the method
    "SelfELoss": "selfe.method.objective",
    "ObjectiveConfig": "selfe.method.objective",
    # the sampling path
    "SamplerConfig": "selfe.sampling.sampler",
    "sample": "selfe.sampling.sampler",
    "FastPathConfig": "selfe.sampling.fast_path",
    "SelfEPipeline": "selfe.sampling.pipeline",
    "SelfEPipelineOutput": "selfe.sampling.pipeline",
    "RequestLimits": "selfe.sampling.request_limits",
    # components
    "AutoEncoder": "selfe.components.autoencoder",
    "TextEncoders": "selfe.components.text_encoders",
    "FP8Config": "selfe.components.fp8",
    # ShapesEval's model, shipped with the package
    "shipped_model_dir": "selfe.shapes",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
