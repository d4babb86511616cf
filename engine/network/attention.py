"""Joint attention as one pure function with a backend switch, and the padded rows' path through it.

Every block calls `attention(q, k, v, key_mask, backend)`; the backend is a name looked up in a
registry, so flash-attn or a fused Triton kernel plugs in with `register_attention_backend` (or
lazily, by naming a provider module in `_PROVIDERS`) without touching the model. Optional imports
happen only inside a backend, on first use.

A second registry holds "rope-fused" backends, which rotate q and k themselves (RoPE applied to
the tiles as they load, so the rotated q, k never go through memory): blocks ask
`applies_rope(backend)` once, then only RMS-norm q, k and call `rope_attention(q, k, v, cos, sin,
key_mask, backend)` instead.

Backends: "sdpa" (torch's scaled_dot_product_attention), "sdpa_cudnn" (the same, cuDNN's fused attention
tried first), "math" (explicit float32 softmax: the oracle every other backend is tested against), "auto"
(the default: sdpa_cudnn on CUDA, measured fastest there; sdpa elsewhere), "varlen" (padded rows through
variable-length attention, `selfe.network.varlen`; otherwise as auto); rope-fused: "triton_rope"
(selfe.kernels.rope_attention, imported on first use).

Layout and padding. The model lays the joint sequence out image first, then text ([img; txt], the RoPE
ids travel with their tokens: attention is exact under any order of the tokens), so a row's text padding
sits at its end: row b attends to the prefix of its first `key_lengths[b]` = image + real text keys. The
blocks call `padded_attention(q, k, v, key_lengths, backend)` (`padded_rope_attention` for a rope-fused
backend) with key_lengths a (B,) tensor (data, so a compiled step serves every prompt length of a text
bucket without a recompile), or None when every key is valid. The path:
- key_lengths None (no text mask, or the eager model found every text token real): the backend's plain
  call; no mask tensor exists (SDPA picks cuDNN's / flash's fastest kernels);
- "varlen": the valid keys packed without their padding, torch's FlashAttention varlen kernel on CUDA
  (its pure-PyTorch reference on the CPU): padding costs no attention FLOPs and no mask is built;
- any other backend (auto included): the (B, L) mask of the prefixes (`prefix_key_mask`), the masked
  reference. auto keeps it because on an H200 at the 2b shapes cuDNN with the mask (370 TFLOP/s) beat
  torch's flash (328 unmasked; bench/RESULTS.md, 2026-12-04); switch by measurement, not by default.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfe.kernels import reference
from selfe.network.varlen import varlen_padded_attention

# fn(q, k, v, key_mask) -> (B, H, L, Dh); `attention` does the head merge.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

# fn(q, k, v, cos, sin, key_mask) -> (B, H, L, Dh), with q, k normed but not yet rotated.
RopeAttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

_REGISTRY: dict[str, AttentionFn] = {}
# Backends provided by another module, imported on first request (which registers the name).
_PROVIDERS: dict[str, str] = {}
_ROPE_REGISTRY: dict[str, RopeAttentionFn] = {}
# Rope-fused backends from selfe.kernels: (module, function), registered here on first request, since
# selfe.kernels may not import this module to register itself.
_ROPE_PROVIDERS: dict[str, tuple[str, str]] = {
    "triton_rope": ("selfe.kernels.rope_attention", "fused_rope_attention"),
}


def _check_name(name: str, other_kind: set[str], kind: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"attention backend name must be a non-empty str, got {name!r}")
    if name in other_kind:  # one name, one calling convention: blocks pick theirs by name
        raise ValueError(f"attention backend {name!r} is already registered as a {kind} backend")


def register_attention_backend(name: str, fn: AttentionFn) -> AttentionFn:
    """Register `fn(q, k, v, key_mask) -> (B, H, L, Dh)` under `name` (replacing any earlier one)."""
    _check_name(name, set(_ROPE_REGISTRY) | set(_ROPE_PROVIDERS), "rope-fused")
    _REGISTRY[name] = fn
    return fn


def register_rope_attention_backend(name: str, fn: RopeAttentionFn) -> RopeAttentionFn:
    """Register a rope-fused `fn(q, k, v, cos, sin, key_mask) -> (B, H, L, Dh)` under `name`.

    fn gets q, k RMS-normed but not rotated, and cos, sin: (L, Dh/2) for the pairs (2i, 2i+1).
    """
    _check_name(name, set(_REGISTRY) | set(_PROVIDERS), "plain")
    _ROPE_REGISTRY[name] = fn
    return fn


def known_attention_backends() -> tuple[str, ...]:
    """Every backend name a block accepts, plain or rope-fused (registered or provided lazily); importing nothing."""
    return tuple(sorted(set(_REGISTRY) | set(_PROVIDERS) | set(_ROPE_REGISTRY) | set(_ROPE_PROVIDERS)))


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown attention backend {name!r}; known: {', '.join(known_attention_backends())}")


def applies_rope(name: str) -> bool:
    """True when backend `name` rotates q and k itself (call `rope_attention`), False for a plain one."""
    if name in _ROPE_REGISTRY or name in _ROPE_PROVIDERS:
        return True
    if name in _REGISTRY or name in _PROVIDERS:
        return False
    raise _unknown(name)


def get_attention_backend(name: str) -> AttentionFn:
    """The implementation registered under `name`; unknown names raise a ValueError listing the known ones."""
    fn = _REGISTRY.get(name)
    if fn is None and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])  # registers `name`; import errors surface here, by name
        fn = _REGISTRY.get(name)
    if fn is None:
        if name in _ROPE_REGISTRY or name in _ROPE_PROVIDERS:
            raise ValueError(f"attention backend {name!r} applies RoPE itself; call rope_attention")
        raise _unknown(name)
    return fn


def get_rope_attention_backend(name: str) -> RopeAttentionFn:
    """The rope-fused implementation under `name`, importing its provider on first use (errors surface here)."""
    fn = _ROPE_REGISTRY.get(name)
    if fn is None and name in _ROPE_PROVIDERS:
        module, function = _ROPE_PROVIDERS[name]
        fn = register_rope_attention_backend(name, getattr(importlib.import_module(module), function))
    if fn is None:
        if name in _REGISTRY or name in _PROVIDERS:
            raise ValueError(f"attention backend {name!r} does not apply RoPE; call attention")
        raise _unknown(name)
    return fn


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    # No mask when all keys are valid: only then can SDPA pick the flash / cuDNN kernels.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# A key mask (text padding) rules flash out, and torch's default order then takes the memory-efficient
# kernel before cuDNN's, which accepts the mask on Hopper; bench/kernels.py times both with the mask.
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_cudnn_first(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    with sdpa_kernel(_CUDNN_FIRST, set_priority=True):  # a backend that cannot take the inputs is skipped
        return _sdpa(q, k, v, key_mask)


def _sdpa_auto(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    # cuDNN first on CUDA: on an H200 at the 2b shapes (bench/RESULTS.md, 2026-12-04) it ran the forward at
    # 603 TFLOP/s against flash's 328, and with the text mask 3x faster than the memory-efficient kernel.
    return _sdpa_cudnn_first(q, k, v, key_mask) if q.is_cuda else _sdpa(q, k, v, key_mask)


register_attention_backend("sdpa", _sdpa)
register_attention_backend("sdpa_cudnn", _sdpa_cudnn_first)
register_attention_backend("math", reference.masked_softmax_attention)
register_attention_backend("auto", _sdpa_auto)
# Without padding, or given a mask rather than key lengths, varlen is auto: plain cuDNN-first SDPA.
register_attention_backend("varlen", _sdpa_auto)

# Backends that take the padded rows' key lengths themselves (no mask): fn(q, k, v, key_lengths) -> (B, H, L, Dh).
_KEY_LENGTH_BACKENDS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "varlen": varlen_padded_attention,
}


def prefix_key_mask(key_lengths: Tensor, length: int) -> Tensor:
    """(B,) valid-key counts -> the (B, length) bool mask, True on row b's keys [0, key_lengths[b])."""
    return torch.arange(length, device=key_lengths.device) < key_lengths[:, None]


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Softmax attention with scale 1/sqrt(Dh), heads merged.

    q, k, v: (B, H, L, Dh), RoPE already applied. key_mask: (B, L) bool, True = a key that may be
    attended to, or None when every key is valid (the fast path). Every query row must keep at least
    one valid key (image tokens always are). Returns (B, L, H * Dh).
    """
    _check_qkv(q, k, v, key_mask)
    out = get_attention_backend(backend)(q, k, v, key_mask)
    return out.transpose(1, 2).flatten(2)


def padded_attention(
    q: Tensor, k: Tensor, v: Tensor, key_lengths: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """`attention` for rows whose padding keys sit last: row b attends to its first key_lengths[b] keys.

    q, k, v: (B, H, L, Dh), RoPE applied; key_lengths: (B,) integer tensor with values in [1, L], or None
    when every key is valid (then no mask is built at all). Returns (B, L, H * Dh).
    """
    _check_qkv(q, k, v, None)
    _check_key_lengths(key_lengths, q)
    if key_lengths is not None and backend in _KEY_LENGTH_BACKENDS:
        return _KEY_LENGTH_BACKENDS[backend](q, k, v, key_lengths).transpose(1, 2).flatten(2)
    mask = None if key_lengths is None else prefix_key_mask(key_lengths, q.shape[2])
    return attention(q, k, v, mask, backend)


def padded_rope_attention(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_lengths: Tensor | None, backend: str
) -> Tensor:
    """`rope_attention` for rows whose padding keys sit last (key_lengths as in `padded_attention`): a
    rope-fused backend takes a mask, so it gets the prefixes' mask, or None when every key is valid."""
    _check_key_lengths(key_lengths, q)
    mask = None if key_lengths is None else prefix_key_mask(key_lengths, q.shape[2])
    return rope_attention(q, k, v, cos, sin, mask, backend)


def rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_mask: Tensor | None = None,
    backend: str = "triton_rope",
) -> Tensor:
    """`attention(rope(q), rope(k), v, key_mask)` with the rotation done by a rope-fused backend.

    q, k, v: (B, H, L, Dh), q and k RMS-normed but NOT rotated; cos, sin: (L, Dh/2) float32 tables of
    the whole sequence; key_mask as in `attention`. Returns (B, L, H * Dh).
    """
    _check_qkv(q, k, v, key_mask)
    table = (q.shape[2], q.shape[3] // 2)
    if cos.shape != table or sin.shape != table:
        raise ValueError(
            f"rope_attention cos, sin must be (L, Dh/2) = {table}, got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    out = get_rope_attention_backend(backend)(q, k, v, cos, sin, key_mask)
    return out.transpose(1, 2).flatten(2)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape (B, H, L, Dh); got {q.shape}, {k.shape}, {v.shape}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (q.shape[0], q.shape[2])):
        raise ValueError(
            f"attention key_mask must be bool of shape (B, L) = {(q.shape[0], q.shape[2])}, "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def _check_key_lengths(key_lengths: Tensor | None, q: Tensor) -> None:
    if key_lengths is None:
        return
    if key_lengths.shape != (q.shape[0],) or key_lengths.is_floating_point() or key_lengths.dtype == torch.bool:
        raise ValueError(
            f"attention key_lengths must be an integer tensor of shape (B,) = ({q.shape[0]},), "
            f"got {key_lengths.dtype} {tuple(key_lengths.shape)}"
        )
