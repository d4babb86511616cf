"""torch.compile at static shapes, one trace per input shape, for the parts around the denoiser.

The text encoders and the decoder see a handful of shapes in serving (a text bucket, a resolution, a
batch), so each is compiled with `dynamic=False`: a trace per shape, each as fast as a static graph can be,
and a new shape recompiles once without touching the others. Dynamo's recompile limit (8 traces per code
object by default) is raised to `max_shapes` while the compiled call runs; past that many shapes the eager
function runs, with one warning per shape, rather than dynamo silently falling back for good.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves


def recompile_limits(max_shapes: int) -> dict[str, int]:
    """Dynamo's limits raised to hold `max_shapes` traces of one code object (a few spare for other guards);
    for `torch._dynamo.config.patch(**...)` around the compiled call."""
    config, wanted = torch._dynamo.config, max_shapes + 8
    return {
        "recompile_limit": max(config.recompile_limit, wanted),
        "accumulated_recompile_limit": max(config.accumulated_recompile_limit, wanted),
    }


def shape_signature(*args: Any, **kwargs: Any) -> tuple:
    """(shape, dtype, device) of every tensor among the arguments: what a static-shape trace depends on."""
    return tuple(
        (tuple(leaf.shape), leaf.dtype, str(leaf.device))
        for leaf in tree_leaves((args, kwargs))
        if isinstance(leaf, torch.Tensor)
    )


class CompiledPerShape:
    """`fn` compiled with dynamic=False: one trace per input shape, at most `max_shapes` of them.

    Not an nn.Module, so a module can hold one as an attribute without its state dict growing a copy of the
    compiled module's weights. `shapes`: the signatures compiled so far (`shape_signature`)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        backend: Any = "inductor",
        mode: str | None = None,
        max_shapes: int = 16,
        fullgraph: bool = False,
    ):
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be an integer >= 1, got {max_shapes!r}")
        self.fn = fn
        self.name = name
        self.max_shapes = max_shapes
        self.compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=False, fullgraph=fullgraph)
        self.shapes: set[tuple] = set()
        self._eager_shapes: set[tuple] = set()  # past max_shapes, warned once each

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = shape_signature(*args, **kwargs)
        if signature not in self.shapes:
            if len(self.shapes) >= self.max_shapes:
                if signature not in self._eager_shapes:
                    self._eager_shapes.add(signature)
                    warnings.warn(
                        f"the compiled {self.name} already serves {self.max_shapes} shapes; inputs "
                        f"{signature} run uncompiled (raise FastPathConfig.max_compiled_shapes to compile them)",
                        UserWarning,
                        stacklevel=2,
                    )
                return self.fn(*args, **kwargs)
            self.shapes.add(signature)
        with torch._dynamo.config.patch(**recompile_limits(self.max_shapes)):
            return self.compiled(*args, **kwargs)


__all__ = ["CompiledPerShape", "recompile_limits", "shape_signature"]
