"""The `cuda` backend: forward passes from the CUDA C++ extension `selfe._C` (csrc/), registered as torch ops.

Forward kernels are plain CUDA (csrc/modulation.cu, csrc/renorm.cu); the backward passes reuse the
Triton backward ops (selfe.kernels.modulation / renorm) when triton is installed, else the vector-Jacobian
product of the PyTorch reference. Importing this module fails with a clear ImportError when the
extension is not built, so `dispatch.get_op(..., "cuda", ...)` raises and `auto` falls back quietly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from selfe.kernels import dispatch, reference

try:
    from selfe import _C
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "selfe._C (the CUDA extension of csrc/) is not built in this install; it builds only against a CUDA "
        "torch with a CUDA toolkit: `SELFE_BUILD_CUDA=1 pip install --no-build-isolation -e .`"
    ) from err


def _require_cuda(op: str, x: Tensor) -> None:
    """The ops are registered for CUDA alone; on other tensors say so, not with the dispatcher's key dump."""
    if x.device.type != "cuda":
        raise RuntimeError(
            f"kernel backend 'cuda' runs on CUDA tensors only, and {op} got {x.device.type} ones; "
            "use kernel_backend 'auto' (torch off CUDA), 'torch' or 'triton' there"
        )


def _triton_backward(module: str, op: str) -> Callable | None:
    """The Triton backward custom op `selfe::<op>`, or None when triton is unavailable."""
    try:
        __import__(module)
    except ImportError:
        return None
    return getattr(torch.ops.selfe, op)


def _reference_vjp(fn: Callable, grads: tuple[Tensor, ...] | Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    """Backward through the PyTorch reference (fallback without triton); traceable by torch.compile."""
    _, vjp = torch.func.vjp(fn, *inputs)
    return vjp(grads)


# ---------------------------------------------------------------------------------------------------
# layer_norm_modulate
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("selfe::cuda_layer_norm_modulate", mutates_args=(), device_types="cuda")
def _layer_norm_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _C.layer_norm_modulate(x, shift, scale, eps)


@_layer_norm_modulate_op.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lnm_setup(ctx, inputs, output) -> None:
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _lnm_backward(ctx, grad: Tensor):
    x, shift, scale = ctx.saved_tensors
    triton_bwd = _triton_backward("selfe.kernels.modulation", "layer_norm_modulate_backward")
    if triton_bwd is not None:
        dx, dshift, dscale = triton_bwd(grad, x, shift, scale, ctx.eps)
    else:
        fn = lambda x_, sh_, sc_: reference.layer_norm_modulate(x_, sh_, sc_, ctx.eps)
        dx, dshift, dscale = _reference_vjp(fn, grad, x, shift, scale)
    return dx, dshift, dscale, None


_layer_norm_modulate_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)


@dispatch.register("layer_norm_modulate", "cuda")
def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN in CUDA C++: LayerNorm(x) `* (1 + scale) + shift`. x: (B, L, D); shift, scale: (B, D)."""
    _require_cuda("layer_norm_modulate", x)
    return _layer_norm_modulate_op(x, shift, scale, float(eps))


# ---------------------------------------------------------------------------------------------------
# gated_residual_modulate
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("selfe::cuda_gated_residual_modulate", mutates_args=(), device_types="cuda")
def _gated_op(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    x_new, out = _C.gated_residual_modulate(x, gate, y, shift, scale, eps)
    return x_new, out


@_gated_op.register_fake
def _(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _gated_setup(ctx, inputs, output) -> None:
    x, gate, y, shift, scale, eps = inputs
    ctx.save_for_backward(output[0], gate, y, shift, scale)  # x' (not x): x can be freed
    ctx.eps = eps


def _gated_backward(ctx, grad_x_new: Tensor | None, grad_out: Tensor | None):
    x_new, gate, y, shift, scale = ctx.saved_tensors
    grad_x_new = torch.zeros_like(x_new) if grad_x_new is None else grad_x_new
    grad_out = torch.zeros_like(x_new) if grad_out is None else grad_out
    triton_bwd = _triton_backward("selfe.kernels.modulation", "gated_residual_modulate_backward")
    if triton_bwd is not None:
        dx, dgate, dy, dshift, dscale = triton_bwd(
            grad_x_new, grad_out, x_new, gate, y, shift, scale, ctx.eps
        )
        return dx, dgate, dy, dshift, dscale, None
    # Reference fallback: the modulation's vjp at x', then the residual x' = x + gate * y by hand.
    fn = lambda x_, sh_, sc_: reference.layer_norm_modulate(x_, sh_, sc_, ctx.eps)
    d_ln, dshift, dscale = _reference_vjp(fn, grad_out, x_new, shift, scale)
    dx = (grad_x_new.float() + d_ln.float()).to(x_new.dtype)
    dy = (gate.float()[:, None, :] * dx.float()).to(y.dtype)
    dgate = (dx.float() * y.float()).sum(dim=1).to(gate.dtype)
    return dx, dgate, dy, dshift, dscale, None


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


@dispatch.register("gated_residual_modulate", "cuda")
def gated_residual_modulate(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """`x' = x + gate * y` and its modulation in one CUDA kernel.

    x, y: (B, L, D); gate, shift, scale: (B, D). Returns (x', modulated), both (B, L, D).
    """
    _require_cuda("gated_residual_modulate", x)
    return _gated_op(x, gate, y, shift, scale, float(eps))


# ---------------------------------------------------------------------------------------------------
# energy_preserving_mix
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("selfe::cuda_energy_preserving_mix", mutates_args=(), device_types="cuda")
def _mix_op(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float) -> Tensor:
    return _C.energy_preserving_mix(p, q, a, b, eps)


@_mix_op.register_fake
def _(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float) -> Tensor:
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _mix_setup(ctx, inputs, output) -> None:
    p, q, a, b, eps = inputs
    ctx.save_for_backward(p, q, a, b)
    ctx.eps = eps


def _mix_backward(ctx, grad: Tensor):
    p, q, a, b = ctx.saved_tensors
    triton_bwd = _triton_backward("selfe.kernels.renorm", "energy_preserving_mix_backward")
    if triton_bwd is not None:
        dp, dq, da, db = triton_bwd(grad, p, q, a, b, ctx.eps)
    else:
        fn = lambda p_, q_, a_, b_: reference.energy_preserving_mix(p_, q_, a_, b_, ctx.eps)
        dp, dq, da, db = _reference_vjp(fn, grad, p, q, a, b)
    return dp, dq, da, db, None


_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup)


@dispatch.register("energy_preserving_mix", "cuda")
def energy_preserving_mix(p: Tensor, q: Tensor, a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """`(a p + b q) * ||p|| / max(||a p + b q||, eps)` per sample in CUDA C++; p, q: (B, ...); a, b: (B,)."""
    _require_cuda("energy_preserving_mix", p)
    return _mix_op(p, q, a, b, float(eps))
