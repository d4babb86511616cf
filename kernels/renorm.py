"""Energy-preserving mix in Triton: `(a p + b q) * ||p|| / ||a p + b q||` per sample, forward and backward.

The op behind Self-E's renormalised training target and its energy-preserving CFG (see
`selfe.kernels.reference.energy_preserving_mix`). Two phases, both over a (B, n_chunks) grid:
1. each program reduces a contiguous chunk of one sample into fp32 partial sums (||p||^2, ||y||^2);
2. each program re-reads its chunk, sums the sample's partials (a handful of numbers) and writes the
   rescaled mix. Partials instead of atomics keep results deterministic run to run.
The backward is the same two phases with more partial sums (see `_mix_bwd_reduce_kernel`).

This module imports triton; `selfe.kernels.dispatch` imports it only when the `triton` backend is asked for.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfe.kernels import dispatch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # elements per tile; a chunk is a whole number of tiles
N_BWD_SUMS = 7  # pp, yy, gy, gp, gq, yp, yq


@triton.jit
def _mix_fwd_reduce_kernel(P, Q, A, Bc, PART, N, chunk_size, n_chunks, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    a = tl.load(A + s).to(tl.float32)
    b = tl.load(Bc + s).to(tl.float32)
    pp = tl.zeros([BLOCK], dtype=tl.float32)
    yy = tl.zeros([BLOCK], dtype=tl.float32)
    start = c * chunk_size
    for i in range(0, chunk_size, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        mask = idx < N
        p = tl.load(P + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(Q + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        y = a * p + b * q
        pp += p * p
        yy += y * y
    out = PART + (s * n_chunks + c) * 2
    tl.store(out, tl.sum(pp, axis=0))
    tl.store(out + 1, tl.sum(yy, axis=0))


@triton.jit
def _mix_fwd_apply_kernel(
    P, Q, A, Bc, PART, OUT, N, chunk_size, n_chunks, eps, BLOCK: tl.constexpr, CHUNKS_BLOCK: tl.constexpr
):
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    a = tl.load(A + s).to(tl.float32)
    b = tl.load(Bc + s).to(tl.float32)
    ci = tl.arange(0, CHUNKS_BLOCK)
    pp = tl.sum(tl.load(PART + (s * n_chunks + ci) * 2, mask=ci < n_chunks, other=0.0), axis=0)
    yy = tl.sum(tl.load(PART + (s * n_chunks + ci) * 2 + 1, mask=ci < n_chunks, other=0.0), axis=0)
    ratio = tl.sqrt(pp) / tl.maximum(tl.sqrt(yy), eps)
    start = c * chunk_size
    for i in range(0, chunk_size, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        mask = idx < N
        p = tl.load(P + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(Q + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        y = (a * p + b * q) * ratio
        tl.store(OUT + s * N + idx, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _mix_bwd_reduce_kernel(P, Q, A, Bc, G, PART, N, chunk_size, n_chunks, BLOCK: tl.constexpr):
    """Partial sums per chunk of pp, yy, g.y, g.p, g.q, y.p, y.q (y = a p + b q).

    Accumulated in float64, unlike the forward: da = r g.p - k_y y.p (and db) cancel, and in fp32 these
    per-sample scalars come out a few times less accurate than torch's elementwise autograd. The kernel
    stays memory bound in fp64 (a few FMAs per element loaded).
    """
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    a = tl.load(A + s).to(tl.float64)
    b = tl.load(Bc + s).to(tl.float64)
    pp = tl.zeros([BLOCK], dtype=tl.float64)
    yy = tl.zeros([BLOCK], dtype=tl.float64)
    gy = tl.zeros([BLOCK], dtype=tl.float64)
    gp = tl.zeros([BLOCK], dtype=tl.float64)
    gq = tl.zeros([BLOCK], dtype=tl.float64)
    yp = tl.zeros([BLOCK], dtype=tl.float64)
    yq = tl.zeros([BLOCK], dtype=tl.float64)
    start = c * chunk_size
    for i in range(0, chunk_size, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        mask = idx < N
        p = tl.load(P + s * N + idx, mask=mask, other=0.0).to(tl.float64)
        q = tl.load(Q + s * N + idx, mask=mask, other=0.0).to(tl.float64)
        g = tl.load(G + s * N + idx, mask=mask, other=0.0).to(tl.float64)
        y = a * p + b * q
        pp += p * p
        yy += y * y
        gy += g * y
        gp += g * p
        gq += g * q
        yp += y * p
        yq += y * q
    out = PART + (s * n_chunks + c) * 7
    tl.store(out + 0, tl.sum(pp, axis=0))
    tl.store(out + 1, tl.sum(yy, axis=0))
    tl.store(out + 2, tl.sum(gy, axis=0))
    tl.store(out + 3, tl.sum(gp, axis=0))
    tl.store(out + 4, tl.sum(gq, axis=0))
    tl.store(out + 5, tl.sum(yp, axis=0))
    tl.store(out + 6, tl.sum(yq, axis=0))


@triton.jit
def _mix_bwd_apply_kernel(P, Q, A, Bc, G, COEF, DP, DQ, N, chunk_size, BLOCK: tl.constexpr):
    """dy = r g - k_y y;  dp = a dy + k_p p;  dq = b dy, with per-sample (r, k_y, k_p) from COEF (B, 3)."""
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    a = tl.load(A + s).to(tl.float32)
    b = tl.load(Bc + s).to(tl.float32)
    r = tl.load(COEF + s * 3)
    k_y = tl.load(COEF + s * 3 + 1)
    k_p = tl.load(COEF + s * 3 + 2)
    start = c * chunk_size
    for i in range(0, chunk_size, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        mask = idx < N
        p = tl.load(P + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(Q + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + s * N + idx, mask=mask, other=0.0).to(tl.float32)
        dy = r * g - k_y * (a * p + b * q)
        tl.store(DP + s * N + idx, (a * dy + k_p * p).to(DP.dtype.element_ty), mask=mask)
        tl.store(DQ + s * N + idx, (b * dy).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _check_runnable(t: Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the triton backend needs CUDA tensors, got a tensor on {t.device} "
            "(set TRITON_INTERPRET=1 before importing selfe.kernels.renorm to run on CPU)"
        )


def _chunking(B: int, N: int, device: torch.device) -> tuple[int, int]:
    """(n_chunks, chunk_size): samples split into whole tiles, B * n_chunks programs filling the device."""
    tiles = triton.cdiv(N, BLOCK)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a few programs, enough that the tests cover multi-chunk partials
        target = 4
    n_chunks = max(1, min(tiles, triton.cdiv(target, B)))
    chunk_tiles = triton.cdiv(tiles, n_chunks)
    return triton.cdiv(tiles, chunk_tiles), chunk_tiles * BLOCK


def mix_coefficients(sums: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample backward coefficients (r, k_y, k_p) from the sums (pp, yy, g.y, ...) of shape (B, >=3).

    out = y r with r = ||p|| / max(||y||, eps) and S = g.y:
    dL/dy = r g - k_y y, k_y = S r / (max(||y||, eps) ||y||) where ||y|| >= eps (the clamp passes no grad);
    dL/dp (through ||p||) = k_p p, k_p = S / (max(||y||, eps) ||p||), zero where ||p|| = 0 as in torch.
    """
    pp, yy, gy = sums[:, 0], sums[:, 1], sums[:, 2]
    n_p, n_y = pp.sqrt(), yy.sqrt()
    n_yc = n_y.clamp_min(eps)
    r = n_p / n_yc
    k_y = torch.where((n_y >= eps) & (n_y > 0), gy * r / (n_yc * n_y.clamp_min(1e-30)), torch.zeros_like(r))
    k_p = torch.where(n_p > 0, gy / (n_yc * n_p.clamp_min(1e-30)), torch.zeros_like(r))
    return r, k_y, k_p


def _check_inputs(p: Tensor, q: Tensor, a: Tensor, b: Tensor) -> None:
    if p.dim() < 1:
        raise ValueError("energy_preserving_mix: p must be (B, ...), got a 0-d tensor")
    if q.shape != p.shape or q.dtype != p.dtype:
        raise ValueError(
            f"energy_preserving_mix: q must match p {tuple(p.shape)} {p.dtype}, "
            f"got {tuple(q.shape)} {q.dtype}"
        )
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"energy_preserving_mix: dtype {p.dtype} not supported by the triton kernels")
    for name, t in (("a", a), ("b", b)):
        if t.shape != (p.shape[0],):
            raise ValueError(
                f"energy_preserving_mix: {name} must be (B,) = ({p.shape[0]},), got {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"energy_preserving_mix: {name} dtype {t.dtype} not supported")
    for name, t in (("q", q), ("a", a), ("b", b)):
        if t.device != p.device:
            raise ValueError(f"energy_preserving_mix: {name} is on {t.device} but p is on {p.device}")


# ---------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("selfe::energy_preserving_mix", mutates_args=())
def _energy_preserving_mix_op(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float) -> Tensor:
    _check_runnable(p)
    p, q, a, b = p.contiguous(), q.contiguous(), a.contiguous(), b.contiguous()
    out = torch.empty_like(p)
    B = p.shape[0]
    if p.numel() == 0:
        return out
    N = p.numel() // B
    n_chunks, chunk_size = _chunking(B, N, p.device)
    part = torch.empty((B, n_chunks, 2), device=p.device, dtype=torch.float32)
    _mix_fwd_reduce_kernel[(B, n_chunks)](p, q, a, b, part, N, chunk_size, n_chunks, BLOCK=BLOCK, num_warps=4)
    _mix_fwd_apply_kernel[(B, n_chunks)](
        p, q, a, b, part, out, N, chunk_size, n_chunks, eps,
        BLOCK=BLOCK, CHUNKS_BLOCK=triton.next_power_of_2(n_chunks), num_warps=4,
    )  # fmt: skip
    return out


@_energy_preserving_mix_op.register_fake
def _(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float) -> Tensor:
    return torch.empty_like(p, memory_format=torch.contiguous_format)


@torch.library.custom_op("selfe::energy_preserving_mix_backward", mutates_args=())
def _energy_preserving_mix_backward_op(
    grad: Tensor, p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dp, dq, da, db) for out = (a p + b q) ||p|| / max(||a p + b q||, eps)."""
    p, q, grad, a, b = p.contiguous(), q.contiguous(), grad.contiguous(), a.contiguous(), b.contiguous()
    B = p.shape[0]
    if p.numel() == 0:
        return torch.zeros_like(p), torch.zeros_like(q), torch.zeros_like(a), torch.zeros_like(b)
    N = p.numel() // B
    n_chunks, chunk_size = _chunking(B, N, p.device)
    part = torch.empty((B, n_chunks, N_BWD_SUMS), device=p.device, dtype=torch.float64)
    _mix_bwd_reduce_kernel[(B, n_chunks)](
        p, q, a, b, grad, part, N, chunk_size, n_chunks, BLOCK=BLOCK // 2, num_warps=8
    )
    sums = part.sum(dim=1)  # (B, 7) float64: the per-sample algebra below cancels, and it is only B numbers
    r, k_y, k_p = mix_coefficients(sums, eps)
    gp, gq, yp, yq = sums[:, 3], sums[:, 4], sums[:, 5], sums[:, 6]
    da = (r * gp - k_y * yp).to(a.dtype)
    db = (r * gq - k_y * yq).to(b.dtype)
    coef = torch.stack((r, k_y, k_p), dim=1).to(torch.float32).contiguous()
    dp, dq = torch.empty_like(p), torch.empty_like(q)
    _mix_bwd_apply_kernel[(B, n_chunks)](
        p, q, a, b, grad, coef, dp, dq, N, chunk_size, BLOCK=BLOCK, num_warps=4
    )
    return dp, dq, da, db


@_energy_preserving_mix_backward_op.register_fake
def _(grad, p, q, a, b, eps):
    def like(t: Tensor) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return like(p), like(q), like(a), like(b)


def _setup(ctx, inputs, output) -> None:
    p, q, a, b, eps = inputs
    ctx.save_for_backward(p, q, a, b)
    ctx.eps = eps


def _backward(ctx, grad: Tensor):
    p, q, a, b = ctx.saved_tensors
    dp, dq, da, db = _energy_preserving_mix_backward_op(grad, p, q, a, b, ctx.eps)
    return dp, dq, da, db, None


_energy_preserving_mix_op.register_autograd(_backward, setup_context=_setup)


@dispatch.register("energy_preserving_mix", "triton")
def energy_preserving_mix(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """`y = a p + b q` rescaled per sample to the norm of p: `y * ||p|| / max(||y||, eps)`.

    p, q: (B, ...) any trailing shape; a, b: (B,). Norms over all non-batch dims, accumulated in fp32.
    """
    _check_inputs(p, q, a, b)
    return _energy_preserving_mix_op(p, q, a, b, float(eps))
