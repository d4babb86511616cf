"""Fused QK RMSNorm + RoPE in Triton: `selfe.kernels.reference.qk_norm_rope` in one pass over q and k.

Forward: each program takes a block of rows (one row = one (b, h, l) head vector of Dh values) of q and
of k, normalises them in float32 with their learned weight, rotates the pairs (2i, 2i+1) by the
angles of the row's position and stores the result once. The reference rounds the normed vector to
the input dtype before rotating; the kernel does not (one rounding instead of two).

Backward: the inverse rotation (the transpose, angle -theta) turns d(out) into d(normed), then the
RMSNorm backward gives d(x); d(weight) is a sum over all rows, accumulated per program in float32
(persistent grid, Liger-Kernel style) and reduced over programs in PyTorch.

q, k may be strided views (a qkv split); outputs and gradients are contiguous (B, H, L, Dh).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfe.kernels.dispatch import register

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel_device(*tensors: Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t.device.type != "cuda" and not (interpreting() and t.device.type == "cpu"):
            raise RuntimeError(
                "the triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a "
                f"tensor on {t.device}; use the 'torch' kernel backend on this device"
            )


@triton.jit
def rotate_pairs(x, c, s, ROWS: tl.constexpr, HALF: tl.constexpr):
    """Rotate the pairs (x[:, 2i], x[:, 2i+1]) by theta_i: x (ROWS, 2*HALF); c = cos, s = sin (ROWS, HALF).

    Pass -sin for the inverse rotation. The pairs are adjacent, so a reshape + split de-interleaves
    them without a second load.
    """
    x_even, x_odd = tl.split(tl.reshape(x, (ROWS, HALF, 2)))
    out = tl.join(x_even * c - x_odd * s, x_even * s + x_odd * c)
    return tl.reshape(out, (ROWS, 2 * HALF))


@triton.jit
def _row_offsets(rows, H, L, stride_b, stride_h, stride_l):
    """Memory offset of row r = (b * H + h) * L + l of a strided (B, H, L, Dh) tensor."""
    b = rows // (H * L)
    h = (rows // L) % H
    pos = rows % L
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + pos.to(tl.int64) * stride_l


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, QW, KW, COS, SIN, QO, KO,
    n_rows, H, L, D,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, scl, scd, ssl, ssd,
    eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_D // 2
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    half = tl.arange(0, HALF)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < D)[None, :]
    half_mask = row_ok[:, None] & (half < D // 2)[None, :]

    pos = rows % L
    c = tl.load(COS + pos[:, None] * scl + half[None, :] * scd, mask=half_mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos[:, None] * ssl + half[None, :] * ssd, mask=half_mask, other=0.0).to(tl.float32)
    out_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]

    # q
    q_offs = _row_offsets(rows, H, L, sqb, sqh, sql)[:, None] + cols[None, :] * sqd
    x = tl.load(Q + q_offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(QW + cols, mask=cols < D, other=0.0).to(tl.float32)
    rrms = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = rotate_pairs(x * rrms[:, None] * w[None, :], c, s, BLOCK_ROWS, HALF)
    tl.store(QO + out_offs, y.to(QO.dtype.element_ty), mask=mask)

    # k
    k_offs = _row_offsets(rows, H, L, skb, skh, skl)[:, None] + cols[None, :] * skd
    x = tl.load(K + k_offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(KW + cols, mask=cols < D, other=0.0).to(tl.float32)
    rrms = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = rotate_pairs(x * rrms[:, None] * w[None, :], c, s, BLOCK_ROWS, HALF)
    tl.store(KO + out_offs, y.to(KO.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_row_block_bwd(
    X, DY, DX, w, c, s, rows, mask, H, L, D, sxb, sxh, sxl, sxd, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward of one row block of one stream: stores d(x), returns this block's d(weight) (BLOCK_D,)."""
    HALF: tl.constexpr = BLOCK_D // 2
    cols = tl.arange(0, BLOCK_D)
    x_offs = _row_offsets(rows, H, L, sxb, sxh, sxl)[:, None] + cols[None, :] * sxd
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    dense_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dy = tl.load(DY + dense_offs, mask=mask, other=0.0).to(tl.float32)
    rrms = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    x_hat = x * rrms[:, None]
    # The rotation is orthogonal: its inverse, the angle -theta, is its transpose.
    d_normed = rotate_pairs(dy, c, -s, BLOCK_ROWS, HALF)
    g = d_normed * w[None, :]
    # d/dx of x * rrms(x): rrms * (g - x_hat * mean(g * x_hat))
    dx = rrms[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / D)[:, None])
    tl.store(DX + dense_offs, dx.to(DX.dtype.element_ty), mask=mask)
    return tl.sum(d_normed * x_hat, axis=0)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    Q, K, QW, KW, COS, SIN, DQO, DKO, DQ, DK, DQW_PARTIAL, DKW_PARTIAL,
    n_rows, H, L, D,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, scl, scd, ssl, ssd,
    eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_D // 2
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    half = tl.arange(0, HALF)
    qw = tl.load(QW + cols, mask=cols < D, other=0.0).to(tl.float32)
    kw = tl.load(KW + cols, mask=cols < D, other=0.0).to(tl.float32)
    dqw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dkw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
    # Persistent grid: each program walks row blocks and keeps its d(weight) partial sums in registers.
    for block in range(pid, n_blocks, n_programs):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < D)[None, :]
        half_mask = row_ok[:, None] & (half < D // 2)[None, :]
        pos = rows % L
        c = tl.load(COS + pos[:, None] * scl + half[None, :] * scd, mask=half_mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + pos[:, None] * ssl + half[None, :] * ssd, mask=half_mask, other=0.0).to(tl.float32)
        dqw += _norm_rope_row_block_bwd(
            Q, DQO, DQ, qw, c, s, rows, mask, H, L, D, sqb, sqh, sql, sqd, eps, BLOCK_ROWS, BLOCK_D
        )
        dkw += _norm_rope_row_block_bwd(
            K, DKO, DK, kw, c, s, rows, mask, H, L, D, skb, skh, skl, skd, eps, BLOCK_ROWS, BLOCK_D
        )
    tl.store(DQW_PARTIAL + pid * BLOCK_D + cols, dqw)
    tl.store(DKW_PARTIAL + pid * BLOCK_D + cols, dkw)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_rows(n_rows: int, block_d: int, elements: int) -> int:
    return max(1, min(triton.next_power_of_2(n_rows), elements // block_d))


def _cos_sin_strides(cos: Tensor, sin: Tensor) -> tuple[int, int, int, int]:
    return cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)


@torch.library.custom_op("selfe::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    check_kernel_device(q, k, q_weight, k_weight, cos, sin)
    B, H, L, D = q.shape
    q_out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, H, L, D), dtype=k.dtype, device=k.device)
    n_rows = B * H * L
    if n_rows == 0:
        return q_out, k_out
    block_d = _block_d(D)
    block_rows = _block_rows(n_rows, block_d, 4096)
    grid = (triton.cdiv(n_rows, block_rows),)
    _qk_norm_rope_fwd_kernel[grid](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out,
        n_rows, H, L, D,
        *q.stride(), *k.stride(), *_cos_sin_strides(cos, sin),
        eps,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("selfe::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
    dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
    cos: Tensor, sin: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_kernel_device(dq_out, dk_out, q, k)
    B, H, L, D = q.shape
    dq = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, L, D), dtype=k.dtype, device=k.device)
    n_rows = B * H * L
    if n_rows == 0:
        return dq, dk, torch.zeros_like(q_weight), torch.zeros_like(k_weight)
    block_d = _block_d(D)
    if q.device.type == "cuda":
        block_rows = _block_rows(n_rows, block_d, 2048)
        n_blocks = triton.cdiv(n_rows, block_rows)
        n_programs = min(n_blocks, 4 * torch.cuda.get_device_properties(q.device).multi_processor_count)
    else:
        # The interpreter sums a block's rows one after another (numpy), not as a tree: small blocks,
        # one program each, and PyTorch's pairwise sum over the partials keep d(weight) accurate.
        block_rows = _block_rows(n_rows, block_d, 256)
        n_programs = triton.cdiv(n_rows, block_rows)
    dqw_partial = torch.empty((n_programs, block_d), dtype=torch.float32, device=q.device)
    dkw_partial = torch.empty((n_programs, block_d), dtype=torch.float32, device=q.device)
    _qk_norm_rope_bwd_kernel[(n_programs,)](
        q, k, q_weight, k_weight, cos, sin, dq_out.contiguous(), dk_out.contiguous(), dq, dk,
        dqw_partial, dkw_partial,
        n_rows, H, L, D,
        *q.stride(), *k.stride(), *_cos_sin_strides(cos, sin),
        eps,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    dq_weight = dqw_partial.sum(0)[:D].to(q_weight.dtype)
    dk_weight = dkw_partial.sum(0)[:D].to(k_weight.dtype)
    return dq, dk, dq_weight, dk_weight


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.eps = eps


def _backward(ctx, dq_out: Tensor, dk_out: Tensor):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk, dq_weight, dk_weight = _qk_norm_rope_backward_op(
        dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, ctx.eps
    )
    return dq, dk, dq_weight, dk_weight, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, Dh), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of {_SUPPORTED_DTYPES}, got {q.dtype} and {k.dtype}")
    head_dim, length = q.shape[-1], q.shape[-2]
    if head_dim % 2:
        raise ValueError(f"the head dim must be even for RoPE pairs, got {head_dim}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,):
            raise ValueError(f"{name} must have shape ({head_dim},), got {tuple(w.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (length, head_dim // 2):
            raise ValueError(
                f"{name} must have shape (L, Dh/2) = ({length}, {head_dim // 2}), got {tuple(t.shape)}"
            )
    devices = {t.device for t in (q, k, q_weight, k_weight, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


@register("qk_norm_rope", "triton")
def qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """QK RMSNorm with learned weights, then RoPE on pairs (2i, 2i+1); differentiable in q, k and the weights.

    q, k: (B, H, L, Dh), any strides; q_weight, k_weight: (Dh,); cos, sin: (L, Dh/2).
    Returns contiguous (q_out, k_out), each (B, H, L, Dh) in the input dtype.
    """
    _check_inputs(q, k, q_weight, k_weight, cos, sin)
    return _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, float(eps))
