"""Joint attention as one pure function with a backend switch.

Every block calls `attention(q, k, v, key_mask, backend)`; the backend is a name looked up in a
registry, so flash-attn or a fused Triton kernel plugs in with `register_attention_backend` (or
lazily, by naming a provider module in `_PROVIDERS`) without touching the model. Optional imports
happen only inside a backend, on first use.

Backends: "sdpa" (torch's scaled_dot_product_attention), "math" (explicit float32 softmax: the
oracle every other backend is tested against), "auto" (currently sdpa).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# fn(q, k, v, key_mask) -> (B, H, L, Dh); `attention` does the head merge.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

_REGISTRY: dict[str, AttentionFn] = {}
# Backends provided by another module, imported on first request (which registers the name).
_PROVIDERS: dict[str, str] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> AttentionFn:
    """Register `fn(q, k, v, key_mask) -> (B, H, L, Dh)` under `name` (replacing any earlier one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"attention backend name must be a non-empty str, got {name!r}")
    _REGISTRY[name] = fn
    return fn


def known_attention_backends() -> tuple[str, ...]:
    """Every name `attention` accepts (registered or provided lazily); importing nothing."""
    return tuple(sorted(set(_REGISTRY) | set(_PROVIDERS)))


def get_attention_backend(name: str) -> AttentionFn:
    """The implementation registered under `name`; unknown names raise a ValueError listing the known ones."""
    fn = _REGISTRY.get(name)
    if fn is None and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])  # registers `name`; import errors surface here, by name
        fn = _REGISTRY.get(name)
    if fn is None:
        raise ValueError(
            f"unknown attention backend {name!r}; known: {', '.join(known_attention_backends())}"
        )
    return fn


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    # No mask when all keys are valid: only then can SDPA pick the flash / cuDNN kernels.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _math(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.to(acc)).to(q.dtype)


register_attention_backend("sdpa", _sdpa)
register_attention_backend("math", _math)
register_attention_backend("auto", _sdpa)


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, backend: str = "sdpa"
) -> Tensor:
    """Softmax attention with scale 1/sqrt(Dh), heads merged.

    q, k, v: (B, H, L, Dh), RoPE already applied. key_mask: (B, L) bool, True = a key that may be
    attended to, or None when every key is valid (the fast path). Every query row must keep at least
    one valid key (image tokens always are). Returns (B, L, H * Dh).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape (B, H, L, Dh); got {q.shape}, {k.shape}, {v.shape}"
        )
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (q.shape[0], q.shape[2])):
        raise ValueError(
            f"attention key_mask must be bool of shape (B, L) = {(q.shape[0], q.shape[2])}, "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    out = get_attention_backend(backend)(q, k, v, key_mask)
    return out.transpose(1, 2).flatten(2)
