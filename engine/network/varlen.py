"""Variable-length attention for padded rows whose padding keys sit last: the keys go packed, without it.

Row b of a (B, H, L, Dh) batch attends to its first `key_lengths[b]` keys (the joint sequence is laid out
[img; txt] with the text padding at the end, `selfe.network.attention`). Its queries stay padded (segments
of L: a padded query's output is never read, but it is finite), its keys and values are packed into one
(B * L, H, Dh) buffer with row b's valid keys at `cu_seq_k[b]:cu_seq_k[b + 1]` and an unread tail. Every
shape depends on (B, L) only and the lengths travel as tensor data, so a compiled step serves every prompt
length of its text bucket without a recompile, and no (B, L) mask is built.

The kernel is torch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention's varlen forward and
backward) on CUDA; `varlen_attention_reference` is the pure-PyTorch op with the same contract: the CPU path
and the oracle the kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfe.kernels import reference

# dtypes FlashAttention's varlen kernel takes.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def cumulative_lengths(lengths: Tensor) -> Tensor:
    """(B,) segment lengths -> (B + 1,) int32 offsets [0, l0, l0 + l1, ...] (FlashAttention's cu_seqlens)."""
    return F.pad(lengths.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def pack_keys(x: Tensor, key_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """The valid keys (or values) of every row, packed.

    x: (B, H, L, Dh); key_lengths: (B,) ints in [0, L]. Returns (packed (B * L, H, Dh), cu_seq_k (B + 1,) int32):
    row b's first key_lengths[b] tokens at cu_seq_k[b]:cu_seq_k[b + 1], zeros in the slots past cu_seq_k[B].
    Differentiable (a gather).
    """
    b, h, length, d = x.shape
    cu_seq_k = cumulative_lengths(key_lengths)
    slot = torch.arange(b * length, dtype=torch.int32, device=x.device)
    row = torch.searchsorted(cu_seq_k[1:], slot, right=True).clamp(max=b - 1)
    position = (slot - cu_seq_k[row]).clamp(max=length - 1)  # the tail's slots: clamped into row B-1
    tokens = x.transpose(1, 2).reshape(b * length, h, d)
    # The kernel neither reads the tail nor need write its gradient (it may leave memory as it found it):
    # `where`, not a product, so nothing from there reaches the real tokens' gradients.
    in_segment = (slot < cu_seq_k[-1])[:, None, None]
    return torch.where(in_segment, tokens[row * length + position], 0), cu_seq_k


def padded_queries(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: (B, H, L, Dh) -> (B * L, H, Dh) tokens and cu_seq_q = [0, L, 2L, ...]: every row's L queries."""
    b, h, length, d = x.shape
    cu_seq_q = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=x.device)
    return x.transpose(1, 2).reshape(b * length, h, d), cu_seq_q


def _unpack(packed: Tensor, cu_seq: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Packed (T, H, Dh) segments -> padded (B, H, max_len, Dh) and the (B, max_len) mask of real tokens."""
    position = torch.arange(max_len, device=packed.device)
    start, count = cu_seq[:-1, None], (cu_seq[1:] - cu_seq[:-1])[:, None]
    index = (start + position).clamp(max=packed.shape[0] - 1)
    return packed[index].transpose(1, 2), position < count


def varlen_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int
) -> Tensor:
    """`varlen_attn`'s math in plain PyTorch: query segment b attends to key segment b, scale 1/sqrt(Dh).

    q: (Tq, H, Dh), k, v: (Tk, H, Dh) packed; cu_seq_q, cu_seq_k: (B + 1,) offsets; max_q, max_k: the
    longest segments. Float32 (float64 for float64) softmax. Returns (Tq, H, Dh); query slots past
    cu_seq_q[B] are zero. Static shapes only (no host sync), so it compiles like the kernel.
    """
    batch = cu_seq_q.shape[0] - 1
    q_pad, _ = _unpack(q, cu_seq_q, max_q)
    k_pad, key_mask = _unpack(k, cu_seq_k, max_k)
    v_pad, _ = _unpack(v, cu_seq_k, max_k)
    out = reference.masked_softmax_attention(q_pad, k_pad, v_pad, key_mask)  # (B, H, max_q, Dh)
    slot = torch.arange(q.shape[0], dtype=cu_seq_q.dtype, device=q.device)
    row = torch.searchsorted(cu_seq_q[1:], slot, right=True)
    inside = row < batch
    row = row.clamp(max=batch - 1)
    position = (slot - cu_seq_q[row]).clamp(min=0, max=max_q - 1)
    packed = out.transpose(1, 2).reshape(batch * max_q, *q.shape[1:])[row * max_q + position]
    return packed * inside[:, None, None]


def _varlen_kernel(q: Tensor, k: Tensor, v: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int):
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9; imported on first use

    return varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k)


def varlen_padded_attention(q: Tensor, k: Tensor, v: Tensor, key_lengths: Tensor) -> Tensor:
    """Attention of every query of row b over its first key_lengths[b] keys, through packed keys.

    q, k, v: (B, H, L, Dh); key_lengths: (B,) ints in [1, L]. The kernel on CUDA (float16 / bfloat16; other
    dtypes are an error: the backend was asked for by name), the reference elsewhere. Returns (B, H, L, Dh).
    """
    b, h, length, d = q.shape
    if q.is_cuda and q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"attention backend 'varlen' runs FlashAttention on CUDA: q must be one of {KERNEL_DTYPES}")
    op = _varlen_kernel if q.is_cuda else varlen_attention_reference
    queries, cu_seq_q = padded_queries(q)
    keys, cu_seq_k = pack_keys(k, key_lengths)
    values, _ = pack_keys(v, key_lengths)
    out = op(queries, keys, values, cu_seq_q, cu_seq_k, length, length)
    return out.view(b, length, h, d).transpose(1, 2)
