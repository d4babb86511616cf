"""Pure-PyTorch definitions of every fused op: the CPU path and the oracle the kernels are tested against.

Each function is the exact math a kernel must reproduce, with the same signature, so a test can
swap one for the other. Reductions run in float32 (or float64 when given float64) and results are
cast back to the input dtype, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN: LayerNorm(x) without affine, then `* (1 + scale) + shift`.

    x: (B, L, D); shift, scale: (B, D), broadcast over the L tokens. Returns (B, L, D) in x.dtype.
    """
    acc = _accum_dtype(x.dtype)
    normed = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)
    out = normed * (1 + scale.to(acc)[:, None, :]) + shift.to(acc)[:, None, :]
    return out.to(x.dtype)


def gated_residual_modulate(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Block-boundary fusion: `x' = x + gate * y`, then the next block's adaLN of x'.

    x, y: (B, L, D); gate, shift, scale: (B, D). Returns (x', layer_norm_modulate(x', shift, scale)).
    """
    acc = _accum_dtype(x.dtype)
    x_new = (x.to(acc) + gate.to(acc)[:, None, :] * y.to(acc)).to(x.dtype)
    return x_new, layer_norm_modulate(x_new, shift, scale, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim with a learned weight; x: (..., D), weight: (D,)."""
    acc = _accum_dtype(x.dtype)
    xf = x.to(acc)
    rrms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rrms * weight.to(acc)).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the head dim by the angles of each position.

    x: (B, H, L, Dh); cos, sin: (L, Dh/2). Computed in float32 (float64 for float64 input).
    """
    acc = _accum_dtype(x.dtype)
    pairs = x.to(acc).unflatten(-1, (-1, 2))
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    c, s = cos.to(acc), sin.to(acc)
    rotated = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """QK RMSNorm (learned weight per stream of heads) followed by RoPE on q and k.

    q, k: (B, H, L, Dh); q_weight, k_weight: (Dh,); cos, sin: (L, Dh/2).
    """
    q = apply_rope(rms_norm(q, q_weight, eps), cos, sin)
    k = apply_rope(rms_norm(k, k_weight, eps), cos, sin)
    return q, k


def per_sample_norm(x: Tensor) -> Tensor:
    """L2 norm of each sample over all non-batch dims, in float32 (float64 for float64). x: (B, ...) -> (B,)."""
    return torch.linalg.vector_norm(x.to(_accum_dtype(x.dtype)).flatten(1), dim=1)


def energy_preserving_mix(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """`y = a p + b q`, rescaled per sample to the norm of p: `y * ||p|| / ||y||`.

    The one op behind both energy-preserving renorms of Self-E:
    - training target: p = x0, q = x_self, a = 1, b = lambda;
    - sampler CFG:     p = V_c, q = V_u,  a = omega, b = 1 - omega.
    p, q: (B, ...); a, b: (B,) per-sample coefficients. Norms accumulate in float32.
    """
    acc = _accum_dtype(p.dtype)
    shape = (-1,) + (1,) * (p.dim() - 1)
    y = a.to(acc).view(shape) * p.to(acc) + b.to(acc).view(shape) * q.to(acc)
    ratio = per_sample_norm(p) / per_sample_norm(y).clamp_min(eps)
    return (y * ratio.view(shape)).to(p.dtype)


def rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_mask: Tensor | None = None,
    sm_scale: float | None = None,
) -> Tensor:
    """Attention with RoPE applied to q and k first: `softmax(rope(q) rope(k)^T * scale, masked) v`.

    q, k, v: (B, H, L, Dh), q and k already RMS-normed but not rotated; cos, sin: (L, Dh/2);
    key_mask: (B, L) bool, True = attend (None: every key); sm_scale defaults to Dh ** -0.5.
    Computed in float32 (float64 for float64). A sample whose mask keeps no key gets a zero output
    (not NaN), as the Triton kernel does. Returns (B, H, L, Dh) in q.dtype.
    """
    acc = _accum_dtype(q.dtype)
    return masked_softmax_attention(
        apply_rope(q.to(acc), cos, sin), apply_rope(k.to(acc), cos, sin), v, key_mask, sm_scale
    ).to(q.dtype)


def masked_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, sm_scale: float | None = None
) -> Tensor:
    """`softmax(q k^T * scale, masked) v`, the attention oracle. q, k, v: (B, H, L, Dh); key_mask: (B, L) bool,
    True = attend. Float32 (float64 for float64); a sample whose mask keeps no key gets zeros, not NaN."""
    acc = _accum_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if key_mask is not None:
        keep = key_mask[:, None, None, :]
        any_key = key_mask.any(dim=-1)[:, None, None, None]
        # Rows with no key at all softmax over zeros, then are zeroed: finite values and gradients.
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0)
        probs = torch.softmax(scores, dim=-1) * any_key
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v.to(acc)).to(q.dtype)
