"""adaLN modulation in Triton: `layer_norm_modulate` and `gated_residual_modulate`, forward and backward.

One op family per file (the Liger-Kernel layout): the Triton kernels, the launchers that allocate outputs
and pick block sizes, and the `selfe::` custom ops with their fake and autograd registrations. The exact
math is `selfe.kernels.reference`; loads upcast to float32 at once and stores cast back to the input dtype.

Row statistics (mean, rstd) are not saved: the backward reloads the row anyway and recomputes them for
free, so each op returns exactly the reference's outputs and nothing else.

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
MAX_BLOCK_D = 65536  # one row lives in registers; wider rows would spill


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _modulate_row(x, shift, scale, mask, D, eps):
    """LayerNorm of one fp32 row (masked lanes ignored), then `* (1 + scale) + shift`."""
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    return xc * rstd * (1.0 + scale) + shift


@triton.jit
def _layer_norm_modulate_fwd_kernel(X, SHIFT, SCALE, OUT, L, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (b, l) row per program
    b = row // L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    out = _modulate_row(x, shift, scale, mask, D, eps)
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_modulate_fwd_kernel(
    X, GATE, Y, SHIFT, SCALE, XNEW, OUT, L, D, eps, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    x_new = (x + gate * y).to(XNEW.dtype.element_ty)
    tl.store(XNEW + row * D + cols, x_new, mask=mask)
    # Normalise the stored (rounded) residual, as the reference does, so outputs agree bit for bit in spirit.
    shift = tl.load(SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    out = _modulate_row(x_new.to(tl.float32), shift, scale, mask, D, eps)
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_bwd_kernel(
    X, SCALE, DOUT, DX, DSCALE_PART, DSHIFT_PART,
    DXNEW, Y, GATE, DY, DGATE_PART,
    L, D, n_chunks, rows_per_chunk, eps,
    HAS_GATE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward of the modulation over rows [chunk * rows_per_chunk, ...) of sample b.

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = dout * (1 + scale);
    per-chunk partial sums of dshift = sum dout and dscale = sum dout * xhat go to fp32 buffers
    (B, n_chunks, D) that the launcher sums, which keeps the result deterministic (no atomics).
    With HAS_GATE, X is the residual x' = x + gate * y and the incoming grad of x' (DXNEW) is added:
    dx = dx', dy = gate * dx', dgate = sum dx' * y.
    """
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    scale = tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)
    for token in range(start, end):
        offs = (b * L + token) * D + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
        xhat = xc * rstd
        g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        dshift += g
        dscale += g * xhat
        dxhat = g * (1.0 + scale)
        c1 = tl.sum(dxhat * xhat, axis=0) / D
        c2 = tl.sum(dxhat, axis=0) / D
        dx = (dxhat - (xhat * c1 + c2)) * rstd
        if HAS_GATE:
            dx += tl.load(DXNEW + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            dgate += dx * y
            tl.store(DY + offs, (gate * dx).to(DY.dtype.element_ty), mask=mask)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * n_chunks + chunk) * D + cols
    tl.store(DSCALE_PART + part, dscale, mask=mask)
    tl.store(DSHIFT_PART + part, dshift, mask=mask)
    if HAS_GATE:
        tl.store(DGATE_PART + part, dgate, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _row_settings(D: int) -> tuple[int, int]:
    """Block width (next power of two >= D) and warps for a kernel that holds one row in registers."""
    block = triton.next_power_of_2(D)
    if block > MAX_BLOCK_D:
        raise ValueError(f"feature dim D={D} exceeds the Triton modulation kernels' limit of {MAX_BLOCK_D}")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def _check_runnable(t: Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the triton backend needs CUDA tensors, got a tensor on {t.device} "
            "(set TRITON_INTERPRET=1 before importing selfe.kernels.modulation to run on CPU)"
        )


def _backward_chunks(B: int, L: int, device: torch.device) -> tuple[int, int]:
    """Split each sample's L rows into chunks so that B * n_chunks programs fill the device."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another; fewer is faster
        target = 2
    n_chunks = max(1, min(L, triton.cdiv(target, B)))
    rows_per_chunk = triton.cdiv(L, n_chunks)
    return triton.cdiv(L, rows_per_chunk), rows_per_chunk


def _launch_modulate_bwd(
    grad: Tensor, x: Tensor, scale: Tensor, eps: float,
    grad_x_new: Tensor | None = None, y: Tensor | None = None, gate: Tensor | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Run the backward kernel: (dx, dshift, dscale, dy, dgate); dy, dgate None without a gate.

    dshift, dscale, dgate are fp32 sums over the tokens; the caller casts them.
    """
    _check_runnable(x)
    B, L, D = x.shape
    block, num_warps = _row_settings(D)
    n_chunks, rows_per_chunk = _backward_chunks(B, L, x.device)
    has_gate = gate is not None
    dx = torch.empty_like(x)
    part = torch.empty((3 if has_gate else 2, B, n_chunks, D), device=x.device, dtype=torch.float32)
    dy = torch.empty_like(y) if has_gate else dx
    _modulate_bwd_kernel[(B, n_chunks)](
        x, scale, grad, dx, part[0], part[1],
        grad_x_new if has_gate else grad, y if has_gate else x, gate if has_gate else scale, dy,
        part[2] if has_gate else part[0],
        L, D, n_chunks, rows_per_chunk, eps,
        HAS_GATE=has_gate, BLOCK_D=block, num_warps=num_warps,
    )  # fmt: skip
    # Separate reductions, not views of one tensor: a custom op's outputs may not alias each other.
    dscale, dshift = part[0].sum(dim=1), part[1].sum(dim=1)
    return dx, dshift, dscale, dy, (part[2].sum(dim=1) if has_gate else None)


def _check_inputs(name: str, x: Tensor, per_token: dict[str, Tensor], per_sample: dict[str, Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (B, L, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}: x dtype {x.dtype} not supported by the triton kernels ({SUPPORTED_DTYPES})"
        )
    B, _, D = x.shape
    for arg, t in per_token.items():
        if t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(
                f"{name}: {arg} must match x {tuple(x.shape)} {x.dtype}, got {tuple(t.shape)} {t.dtype}"
            )
    for arg, t in per_sample.items():
        if t.shape != (B, D):
            raise ValueError(f"{name}: {arg} must be (B, D) = {(B, D)}, got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: {arg} dtype {t.dtype} not supported ({SUPPORTED_DTYPES})")
    for arg, t in {"x": x, **per_token, **per_sample}.items():
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}")


# ---------------------------------------------------------------------------------------------------
# layer_norm_modulate: custom op, fake, autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("selfe::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    _check_runnable(x)
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    B, L, D = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    block, num_warps = _row_settings(D)
    _layer_norm_modulate_fwd_kernel[(B * L,)](
        x, shift, scale, out, L, D, eps, BLOCK_D=block, num_warps=num_warps
    )
    return out


@_layer_norm_modulate_op.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("selfe::layer_norm_modulate_backward", mutates_args=())
def _layer_norm_modulate_backward_op(
    grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    grad, x, scale = grad.contiguous(), x.contiguous(), scale.contiguous()
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(shift), torch.zeros_like(scale)
    dx, dshift, dscale, _, _ = _launch_modulate_bwd(grad, x, scale, eps)
    return dx, dshift.to(shift.dtype), dscale.to(scale.dtype)


@_layer_norm_modulate_backward_op.register_fake
def _(grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty(shift.shape, dtype=shift.dtype, device=shift.device),
        torch.empty(scale.shape, dtype=scale.dtype, device=scale.device),
    )


def _layer_norm_modulate_setup(ctx, inputs, output) -> None:
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _layer_norm_modulate_bwd(ctx, grad: Tensor):
    x, shift, scale = ctx.saved_tensors
    dx, dshift, dscale = _layer_norm_modulate_backward_op(grad, x, shift, scale, ctx.eps)
    return dx, dshift, dscale, None


_layer_norm_modulate_op.register_autograd(_layer_norm_modulate_bwd, setup_context=_layer_norm_modulate_setup)


@dispatch.register("layer_norm_modulate", "triton")
def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN: LayerNorm(x) (no affine) `* (1 + scale) + shift`.

    x: (B, L, D); shift, scale: (B, D), broadcast over the L tokens. Returns (B, L, D) in x.dtype.
    """
    _check_inputs("layer_norm_modulate", x, {}, {"shift": shift, "scale": scale})
    return _layer_norm_modulate_op(x, shift, scale, float(eps))


# ---------------------------------------------------------------------------------------------------
# gated_residual_modulate: custom op, fake, autograd
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("selfe::gated_residual_modulate", mutates_args=())
def _gated_residual_modulate_op(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    _check_runnable(x)
    x, gate, y = x.contiguous(), gate.contiguous(), y.contiguous()
    shift, scale = shift.contiguous(), scale.contiguous()
    B, L, D = x.shape
    x_new, out = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return x_new, out
    block, num_warps = _row_settings(D)
    _gated_residual_modulate_fwd_kernel[(B * L,)](
        x, gate, y, shift, scale, x_new, out, L, D, eps, BLOCK_D=block, num_warps=num_warps
    )
    return x_new, out


@_gated_residual_modulate_op.register_fake
def _(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


@torch.library.custom_op("selfe::gated_residual_modulate_backward", mutates_args=())
def _gated_residual_modulate_backward_op(
    grad_x_new: Tensor,
    grad_out: Tensor,
    x_new: Tensor,
    gate: Tensor,
    y: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads (dx, dgate, dy, dshift, dscale) from the grads of both outputs; x_new is the saved residual."""
    if x_new.numel() == 0:
        return (torch.zeros_like(x_new), torch.zeros_like(gate), torch.zeros_like(y), torch.zeros_like(shift),
                torch.zeros_like(scale))  # fmt: skip
    grad_x_new, grad_out, x_new = grad_x_new.contiguous(), grad_out.contiguous(), x_new.contiguous()
    dx, dshift, dscale, dy, dgate = _launch_modulate_bwd(
        grad_out,
        x_new,
        scale.contiguous(),
        eps,
        grad_x_new=grad_x_new,
        y=y.contiguous(),
        gate=gate.contiguous(),
    )
    return dx, dgate.to(gate.dtype), dy, dshift.to(shift.dtype), dscale.to(scale.dtype)


@_gated_residual_modulate_backward_op.register_fake
def _(grad_x_new, grad_out, x_new, gate, y, shift, scale, eps):
    def like(t: Tensor) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return like(x_new), like(gate), like(y), like(shift), like(scale)


def _gated_setup(ctx, inputs, output) -> None:
    x, gate, y, shift, scale, eps = inputs
    x_new, _ = output
    ctx.save_for_backward(x_new, gate, y, shift, scale)
    ctx.eps = eps


def _gated_bwd(ctx, grad_x_new: Tensor | None, grad_out: Tensor | None):
    x_new, gate, y, shift, scale = ctx.saved_tensors
    grad_x_new = torch.zeros_like(x_new) if grad_x_new is None else grad_x_new
    grad_out = torch.zeros_like(x_new) if grad_out is None else grad_out
    dx, dgate, dy, dshift, dscale = _gated_residual_modulate_backward_op(
        grad_x_new, grad_out, x_new, gate, y, shift, scale, ctx.eps
    )
    return dx, dgate, dy, dshift, dscale, None


_gated_residual_modulate_op.register_autograd(_gated_bwd, setup_context=_gated_setup)


@dispatch.register("gated_residual_modulate", "triton")
def gated_residual_modulate(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """`x' = x + gate * y` and LayerNorm(x') `* (1 + scale) + shift` in one pass.

    x, y: (B, L, D); gate, shift, scale: (B, D). Returns (x', modulated), both (B, L, D) in x.dtype.
    """
    _check_inputs("gated_residual_modulate", x, {"y": y}, {"gate": gate, "shift": shift, "scale": scale})
    return _gated_residual_modulate_op(x, gate, y, shift, scale, float(eps))
