"""Flash attention in Triton that applies RoPE to the Q and K tiles as it loads them.

The exact math is `selfe.kernels.reference.rope_attention`: q and k arrive RMS-normed but not
rotated, each tile is rotated in float32 on load (pairs (2i, 2i+1), by the angles of its rows'
positions), cast back to the input dtype for the tensor-core dot, and attention proceeds as in
FlashAttention-2: online softmax in float32 (exp2 with log2(e) folded into the scale), a boolean key
mask (B, L) for variable text length, and the logsumexp (B, H, L) saved for the backward.

Backward (FlashAttention-2): a preprocess computes delta = rowsum(dO * O); one kernel per key block
accumulates dK and dV over query blocks, one kernel per query block accumulates dQ over key blocks.
The rotation is applied on load again, and the accumulated dQ / dK, which are gradients w.r.t. the
rotated q / k, are rotated back (angle -theta, the transpose) before they are stored, so the
gradients are w.r.t. the unrotated inputs.

A sample whose mask keeps no key gets zero outputs and zero gradients.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfe.kernels.qk_norm_rope import check_kernel_device, interpreting, rotate_pairs

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


AUTOTUNE_ENV = "SELFE_TRITON_AUTOTUNE"  # full (default) or quick; read when this module is imported


def _configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); one small one under the interpreter.

    SELFE_TRITON_AUTOTUNE=quick keeps the first and the last (a small tile that fits every case) of each
    list: a large and a small tile, a third of the compiles (the GPU tests, where every new shape autotunes)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    mode = os.environ.get(AUTOTUNE_ENV, "full")
    if mode not in ("full", "quick"):
        raise ValueError(f"{AUTOTUNE_ENV}={mode!r}; use full or quick")
    if mode == "quick":
        gpu = [gpu[0], gpu[-1]]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# Each list ends with small two-stage tiles: compiled for sm_90, the large ones need more than its 227 KiB
# of shared memory at head dim 128 in float32 or 256 in any dtype (the autotuner skips a config that does
# not fit, and with none left it fails). tests/kernels/test_triton_sm90_compile.py checks every list.
_FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (64, 64, 4, 2),
     (64, 32, 4, 2)]
)  # fmt: skip
# dK/dV: a key block stays resident while query blocks stream past; dQ: the other way round.
_DKDV_CONFIGS = _configs(
    [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2)]
)
_DQ_CONFIGS = _configs(
    [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2)]
)
_AUTOTUNE_KEY = ["L", "BLOCK_D", "HAS_MASK"]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """a @ b + acc in float32; exact float32 products for float32 inputs (no TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_cos_sin(COS, SIN, rows, L, D, scl, scd, ssl, ssd, HALF: tl.constexpr):
    """cos, sin of the rows' positions: (ROWS, HALF) float32, zero outside the tensor."""
    half = tl.arange(0, HALF)
    mask = (rows < L)[:, None] & (half < D // 2)[None, :]
    c = tl.load(COS + rows[:, None] * scl + half[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + rows[:, None] * ssl + half[None, :] * ssd, mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _load_rows(X, rows, L, D, stride_l, stride_d, BLOCK_D: tl.constexpr):
    """Rows of one (L, D) head slice as (ROWS, BLOCK_D), in the stored dtype, zero outside."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < L)[:, None] & (cols < D)[None, :]
    return tl.load(X + rows[:, None] * stride_l + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _load_rotated(X, COS, SIN, rows, L, D, stride_l, stride_d, scl, scd, ssl, ssd,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Rows of q or k rotated by RoPE in float32, cast back to the stored dtype for the dot."""
    x = _load_rows(X, rows, L, D, stride_l, stride_d, BLOCK_D).to(tl.float32)
    c, s = _load_cos_sin(COS, SIN, rows, L, D, scl, scd, ssl, ssd, BLOCK_D // 2)
    return rotate_pairs(x, c, s, ROWS, BLOCK_D // 2).to(X.dtype.element_ty)


@triton.jit
def _key_ok(MASK, b, offs_n, L, smb, sml, HAS_MASK: tl.constexpr):
    """Which keys of this block may be attended: inside the sequence and kept by the mask."""
    ok = offs_n < L
    if HAS_MASK:
        keep = tl.load(MASK + b.to(tl.int64) * smb + offs_n * sml, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _rope_attn_fwd_kernel(
    Q, K, V, COS, SIN, MASK, OUT, LSE,
    H, L, D,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    scl, scd, ssl, ssd, smb, sml,
    sm_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the softmax runs on exp2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rotated(Q, COS, SIN, offs_m, L, D, sql, sqd, scl, scd, ssl, ssd, BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(K, COS, SIN, offs_n, L, D, skl, skd, scl, scd, ssl, ssd, BLOCK_N, BLOCK_D)
        v = _load_rows(V, offs_n, L, D, svl, svd, BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * qk_scale
        s = tl.where(_key_ok(MASK, b, offs_n, L, smb, sml, HAS_MASK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While a row has seen no key, its max is -inf: subtract 0 instead so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # l_i == 0: the mask kept no key; output 0, lse -inf
    acc = acc / l_safe[:, None]
    row_ok = offs_m < L
    o_offs = (bh.to(tl.int64) * L + offs_m)[:, None] * D + cols[None, :]
    tl.store(OUT + o_offs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (cols < D)[None, :])
    # Natural-log logsumexp of the scaled scores.
    lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit
def _rope_attn_bwd_preprocess_kernel(OUT, DO, DELTA, L, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) in float32; O (OUT) and dO contiguous (B, H, L, D)."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (offs_m < L)[:, None] & (cols < D)[None, :]
    offs = (bh.to(tl.int64) * L + offs_m)[:, None] * D + cols[None, :]
    o = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, axis=1), mask=offs_m < L)


@triton.autotune(configs=_DKDV_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _rope_attn_bwd_dkdv_kernel(
    Q, K, V, COS, SIN, MASK, DO, LSE, DELTA, DK, DV,
    H, L, D,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    scl, scd, ssl, ssd, smb, sml,
    sm_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
    row_base = bh.to(tl.int64) * L  # DO, LSE, DELTA, DK, DV are contiguous
    qk_scale = sm_scale * 1.4426950408889634

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = _load_rotated(K, COS, SIN, offs_n, L, D, skl, skd, scl, scd, ssl, ssd, BLOCK_N, BLOCK_D)
    v = _load_rows(V, offs_n, L, D, svl, svd, BLOCK_D)
    key_ok = _key_ok(MASK, b, offs_n, L, smb, sml, HAS_MASK)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = _load_rotated(Q, COS, SIN, offs_m, L, D, sql, sqd, scl, scd, ssl, ssd, BLOCK_M, BLOCK_D)
        do = _load_rows(DO + row_base * D, offs_m, L, D, D, 1, BLOCK_D)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        # Transposed scores (keys x queries), so dK and dV accumulate without transposing them.
        s_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE) * qk_scale
        p_t = tl.where(key_ok[:, None] & row_ok[None, :], tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, IEEE)
        dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, IEEE)

    c, s = _load_cos_sin(COS, SIN, offs_n, L, D, scl, scd, ssl, ssd, BLOCK_D // 2)
    dk = rotate_pairs(dk * sm_scale, c, -s, BLOCK_N, BLOCK_D // 2)  # back to the unrotated k
    offs = (row_base + offs_n)[:, None] * D + cols[None, :]
    mask = (offs_n < L)[:, None] & (cols < D)[None, :]
    tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _rope_attn_bwd_dq_kernel(
    Q, K, V, COS, SIN, MASK, DO, LSE, DELTA, DQ,
    H, L, D,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    scl, scd, ssl, ssd, smb, sml,
    sm_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
    row_base = bh.to(tl.int64) * L
    qk_scale = sm_scale * 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q = _load_rotated(Q, COS, SIN, offs_m, L, D, sql, sqd, scl, scd, ssl, ssd, BLOCK_M, BLOCK_D)
    do = _load_rows(DO + row_base * D, offs_m, L, D, D, 1, BLOCK_D)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(K, COS, SIN, offs_n, L, D, skl, skd, scl, scd, ssl, ssd, BLOCK_N, BLOCK_D)
        v = _load_rows(V, offs_n, L, D, svl, svd, BLOCK_D)
        key_ok = _key_ok(MASK, b, offs_n, L, smb, sml, HAS_MASK)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * qk_scale
        p = tl.where(row_ok[:, None] & key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, IEEE)

    c, s = _load_cos_sin(COS, SIN, offs_m, L, D, scl, scd, ssl, ssd, BLOCK_D // 2)
    dq = rotate_pairs(dq * sm_scale, c, -s, BLOCK_M, BLOCK_D // 2)  # back to the unrotated q
    offs = (row_base + offs_m)[:, None] * D + cols[None, :]
    tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (cols < D)[None, :])


def _common_args(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None):
    """(mask pointer, the shape and stride arguments shared by all kernels, the mask flag)."""
    _, H, L, D = q.shape
    if key_mask is None:
        mask, mask_strides, has_mask = q, (0, 0), False  # a placeholder pointer the kernel never reads
    else:
        mask = key_mask.view(torch.uint8)  # bool and uint8 share the byte layout; Triton reads bytes
        mask_strides, has_mask = (mask.stride(0), mask.stride(1)), True
    args = (
        H, L, D,
        *q.stride(), *k.stride(), *v.stride(),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), *mask_strides,
    )  # fmt: skip
    return mask, args, has_mask


def _meta(q: Tensor, has_mask: bool) -> dict:
    return {
        "HAS_MASK": has_mask,
        "IEEE": q.dtype == torch.float32,
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
    }


_ATTN_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? key_mask, float sm_scale) -> (Tensor, Tensor)"
)


@torch.library.custom_op("selfe::rope_flash_attention", mutates_args=(), schema=_ATTN_SCHEMA)
def _rope_flash_attention_op(q, k, v, cos, sin, key_mask, sm_scale):
    check_kernel_device(q, k, v, cos, sin)
    B, H, L, D = q.shape
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    mask, args, has_mask = _common_args(q, k, v, cos, sin, key_mask)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
    _rope_attn_fwd_kernel[grid](q, k, v, cos, sin, mask, out, lse, *args, sm_scale, **_meta(q, has_mask))
    return out, lse


@_rope_flash_attention_op.register_fake
def _(q, k, v, cos, sin, key_mask, sm_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


_ATTN_BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? key_mask, Tensor out, "
    "Tensor lse, float sm_scale) -> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("selfe::rope_flash_attention_backward", mutates_args=(), schema=_ATTN_BWD_SCHEMA)
def _rope_flash_attention_backward_op(dout, q, k, v, cos, sin, key_mask, out, lse, sm_scale):
    check_kernel_device(dout, q, k, v)
    B, H, L, D = q.shape
    dq = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, L, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, L, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    dout = dout.contiguous()
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    meta = _meta(q, key_mask is not None)
    block_m = 32 if interpreting() else 64
    _rope_attn_bwd_preprocess_kernel[(triton.cdiv(L, block_m), B * H)](
        out, dout, delta, L, D, BLOCK_M=block_m, BLOCK_D=meta["BLOCK_D"]
    )
    mask, args, _ = _common_args(q, k, v, cos, sin, key_mask)
    grid_n = lambda m: (triton.cdiv(L, m["BLOCK_N"]), B * H)
    _rope_attn_bwd_dkdv_kernel[grid_n](q, k, v, cos, sin, mask, dout, lse, delta, dk, dv, *args, sm_scale, **meta)
    grid_m = lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H)
    _rope_attn_bwd_dq_kernel[grid_m](q, k, v, cos, sin, mask, dout, lse, delta, dq, *args, sm_scale, **meta)
    return dq, dk, dv


@_rope_flash_attention_backward_op.register_fake
def _(dout, q, k, v, cos, sin, key_mask, out, lse, sm_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cos, sin, key_mask, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cos, sin, key_mask, out, lse)
    ctx.sm_scale = sm_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, cos, sin, key_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _rope_flash_attention_backward_op(dout, q, k, v, cos, sin, key_mask, out, lse, ctx.sm_scale)
    return dq, dk, dv, None, None, None, None


_rope_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, Dh), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, _, L, D = q.shape
    if D % 2 or D > _MAX_HEAD_DIM:
        raise ValueError(f"the head dim must be even and at most {_MAX_HEAD_DIM}, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (L, D // 2):
            raise ValueError(f"{name} must have shape (L, Dh/2) = ({L}, {D // 2}), got {tuple(t.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (B, L)):
        raise ValueError(
            f"key_mask must be a bool tensor of shape (B, L) = ({B}, {L}), got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    tensors = (q, k, v, cos, sin) + (() if key_mask is None else (key_mask,))
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def rope_flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_mask: Tensor | None = None,
    sm_scale: float | None = None,
) -> Tensor:
    """softmax(rope(q) rope(k)^T * sm_scale, key-masked) v, with the rotation fused into the tile loads.

    q, k, v: (B, H, L, Dh), any strides, q and k RMS-normed but not rotated; cos, sin: (L, Dh/2)
    (float32); key_mask: (B, L) bool, True = attend, or None; sm_scale defaults to Dh ** -0.5.
    Returns (B, H, L, Dh) contiguous in q.dtype; differentiable in q, k, v.
    """
    _check_inputs(q, k, v, cos, sin, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    out, _ = _rope_flash_attention_op(q, k, v, cos, sin, key_mask, scale)
    return out


def fused_rope_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
    """Attention-backend entry for the model: RoPE fused into flash attention, default scale.

    q, k, v: (B, H, L, Dh) with q, k normed, not rotated; cos, sin: (L, Dh/2); key_mask: (B, L) bool
    or None. Returns (B, H, L, Dh).
    """
    return rope_flash_attention(q, k, v, cos, sin, key_mask)
