"""The MMDiT's building blocks: embedders, modulation, QK-norm, double/single-stream blocks, last layer.

Layout and names follow FLUX (black-forest-labs/flux, modules/layers.py). The fused math (adaLN
modulation, gated residual + modulation, QK RMSNorm + RoPE) goes through `KernelOps`, resolved from
`selfe.kernels.dispatch`, so the reference ops here and the Triton/CUDA kernels are interchangeable;
attention goes through `selfe.network.attention`'s backend switch. A rope-fused attention backend rotates q, k
itself: the blocks then only RMS-norm them and hand it the RoPE tables (`joint_attention`). The joint sequence
is [img; txt], image first, so each row's text padding sits last and is described by its key length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfe.kernels.dispatch import get_op
from selfe.kernels.reference import rms_norm
from selfe.network.attention import applies_rope, padded_attention, padded_rope_attention


@dataclass(frozen=True)
class KernelOps:
    """The fused ops a block calls, resolved once per (backend, device type)."""

    layer_norm_modulate: Callable
    gated_residual_modulate: Callable
    qk_norm_rope: Callable

    @classmethod
    def resolve(cls, backend: str | None, device: torch.device | str) -> KernelOps:
        device = torch.device(device)
        return cls(
            *(
                get_op(name, backend, device)
                for name in ("layer_norm_modulate", "gated_residual_modulate", "qk_norm_rope")
            )
        )


REFERENCE_OPS = KernelOps.resolve("torch", "cpu")


def timestep_embedding(t: Tensor, dim: int, time_factor: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of `t * time_factor` (FLUX), [cos | sin] halves.

    t: (B,) -> (B, dim) in float32 (float64 for float64 t, so a float64 model is an exact oracle).
    """
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=acc, device=t.device) / half)
    args = (t.to(acc) * time_factor)[:, None] * freqs[None, :]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def mlp_activation(name: str) -> nn.Module:
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown MLP activation {name!r}")


class MLPEmbedder(nn.Module):
    """Linear(in, hidden) -> SiLU -> Linear(hidden, hidden): x (B, in) -> (B, hidden)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """adaLN parameters from the global vector: SiLU -> Linear(D, n * D), split into n (B, D) tensors."""

    def __init__(self, hidden_size: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(hidden_size, n * hidden_size)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(nn.functional.silu(vec)).chunk(self.n, dim=-1)


class QKNorm(nn.Module):
    """RMSNorm of q and k with learned (Dh,) weights, then RoPE: one fused op (or RoPE left to attention)."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.query_weight = nn.Parameter(torch.ones(head_dim))
        self.key_weight = nn.Parameter(torch.ones(head_dim))

    def forward(
        self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, ops: KernelOps, rope_in_attention: bool = False
    ) -> tuple[Tensor, Tensor]:
        """q, k: (B, H, L, Dh); cos, sin: (L, Dh/2) -> normalised q, k, rotated unless `rope_in_attention`."""
        if rope_in_attention:  # a rope-fused backend rotates the tiles as it loads them: norm only
            return rms_norm(q, self.query_weight, self.eps), rms_norm(k, self.key_weight, self.eps)
        return ops.qk_norm_rope(q, k, self.query_weight, self.key_weight, cos, sin, self.eps)


def joint_attention(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_lengths: Tensor | None, backend: str
) -> Tensor:
    """Attention over the joint sequence with `backend`. q, k, v: (B, H, L, Dh); cos, sin: (L, Dh/2);
    key_lengths: (B,) valid (leading) keys per row, or None when every key is valid.

    q, k arrive normed; rotated already for a plain backend, unrotated for a rope-fused one (which
    rotates them with cos, sin). Returns (B, L, H * Dh).
    """
    if applies_rope(backend):
        return padded_rope_attention(q, k, v, cos, sin, key_lengths, backend)
    return padded_attention(q, k, v, key_lengths, backend)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3 * H * Dh) -> q, k, v each (B, H, L, Dh)."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate * y with gate (B, D) broadcast over the tokens of x, y: (B, L, D)."""
    return x + gate[:, None, :] * y


class StreamAttention(nn.Module):
    """One stream's attention weights: qkv projection, QK-norm weights, output projection."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.norm = QKNorm(hidden_size // num_heads, eps)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def qkv_heads(
        self, x: Tensor, cos: Tensor, sin: Tensor, ops: KernelOps, rope_in_attention: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, L, D) modulated stream -> q, k (normed; rotated unless `rope_in_attention`), v: (B, H, L, Dh)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, cos, sin, ops, rope_in_attention)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [img; txt] (SD3 / FLUX MMDiT block).

    Each stream: x += gate1 * proj(attn(adaLN1(x))); x += gate2 * mlp(adaLN2(x)), with all six
    modulation vectors from the global vector.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_hidden_dim: int,
        qkv_bias: bool,
        eps: float,
        activation: str = "gelu_tanh",
        attention_backend: str = "auto",
    ):
        super().__init__()
        self.eps = eps
        self.attention_backend = attention_backend
        self.rope_in_attention = applies_rope(attention_backend)  # also rejects unknown names early
        self.kernels = REFERENCE_OPS  # rebound by MMDiT for the device it runs on
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(hidden_size, 6))
            self.add_module(f"{stream}_attn", StreamAttention(hidden_size, num_heads, qkv_bias, eps))
            self.add_module(
                f"{stream}_mlp",
                nn.Sequential(
                    nn.Linear(hidden_size, mlp_hidden_dim),
                    mlp_activation(activation),
                    nn.Linear(mlp_hidden_dim, hidden_size),
                ),
            )

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, cos: Tensor, sin: Tensor, key_lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """img: (B, Li, D), txt: (B, Lt, D), vec: (B, D); cos, sin: (Li + Lt, Dh/2) for [img; txt];
        key_lengths: (B,) valid keys per row (Li + real text), or None. Returns the updated (img, txt)."""
        ops, n_img = self.kernels, img.shape[1]
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        # Each stream norms q, k with its own weights; both are rotated by their slice of the joint table
        # (or, for a rope-fused backend, by the whole table inside attention, after the concatenation).
        fused = self.rope_in_attention
        img_q, img_k, img_v = self.img_attn.qkv_heads(
            ops.layer_norm_modulate(img, img_shift1, img_scale1, self.eps), cos[:n_img], sin[:n_img], ops, fused
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            ops.layer_norm_modulate(txt, txt_shift1, txt_scale1, self.eps), cos[n_img:], sin[n_img:], ops, fused
        )
        out = joint_attention(
            torch.cat((img_q, txt_q), dim=2),
            torch.cat((img_k, txt_k), dim=2),
            torch.cat((img_v, txt_v), dim=2),
            cos,
            sin,
            key_lengths,
            self.attention_backend,
        )
        img_out, txt_out = out[:, :n_img], out[:, n_img:]

        img, img_normed = ops.gated_residual_modulate(
            img, img_gate1, self.img_attn.proj(img_out), img_shift2, img_scale2, self.eps
        )
        img = gated_add(img, img_gate2, self.img_mlp(img_normed))
        txt, txt_normed = ops.gated_residual_modulate(
            txt, txt_gate1, self.txt_attn.proj(txt_out), txt_shift2, txt_scale2, self.eps
        )
        txt = gated_add(txt, txt_gate2, self.txt_mlp(txt_normed))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence (FLUX's single block, after ViT-22B).

    linear1 yields qkv and the MLP input side by side; linear2 maps [attn | act(mlp)] back to D.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_hidden_dim: int,
        eps: float,
        activation: str = "gelu_tanh",
        attention_backend: str = "auto",
    ):
        super().__init__()
        self.eps = eps
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = mlp_hidden_dim
        self.attention_backend = attention_backend
        self.rope_in_attention = applies_rope(attention_backend)  # also rejects unknown names early
        self.kernels = REFERENCE_OPS
        self.modulation = Modulation(hidden_size, 3)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads, eps)
        self.mlp_act = mlp_activation(activation)

    def forward(self, x: Tensor, vec: Tensor, cos: Tensor, sin: Tensor, key_lengths: Tensor | None = None) -> Tensor:
        """x: (B, L, D) joint [img; txt]; vec: (B, D); cos, sin: (L, Dh/2); key_lengths: (B,) valid keys or None."""
        ops = self.kernels
        shift, scale, gate = self.modulation(vec)
        qkv, mlp_in = self.linear1(ops.layer_norm_modulate(x, shift, scale, self.eps)).split(
            (3 * self.hidden_size, self.mlp_hidden_dim), dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, cos, sin, ops, self.rope_in_attention)
        out = joint_attention(q, k, v, cos, sin, key_lengths, self.attention_backend)
        return gated_add(x, gate, self.linear2(torch.cat((out, self.mlp_act(mlp_in)), dim=-1)))


class LastLayer(nn.Module):
    """adaLN (LayerNorm without affine, shift/scale from vec) then Linear(D, patch^2 * C)."""

    def __init__(self, hidden_size: int, out_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.kernels = REFERENCE_OPS
        self.adaLN_modulation = Modulation(hidden_size, 2)
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x: (B, L, D), vec: (B, D) -> (B, L, out_dim)."""
        shift, scale = self.adaLN_modulation(vec)
        return self.linear(self.kernels.layer_norm_modulate(x, shift, scale, self.eps))
