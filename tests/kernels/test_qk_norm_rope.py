"""Triton fused QK RMSNorm + RoPE vs the float64 reference, forward and backward.

Tolerance the flash-attention way: the kernel's error against float64 may be at most twice that of
the PyTorch reference run in the same dtype, plus a tiny atol. Without CUDA the kernel runs through
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from selfe.kernels import dispatch, reference
from selfe.kernels.qk_norm_rope import qk_norm_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Covers reduction-order differences in d(weight), a sum over all B*H*L rows (a few float32 ulps).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}

SHAPES = [(1, 2, 1, 16), (2, 2, 17, 32), (1, 3, 45, 64), (2, 1, 70, 16)]  # (B, H, L, Dh): ragged L


def _inputs(B: int, H: int, L: int, D: int, seed: int):
    """A float64 (B, L, 3, H, Dh) qkv tensor, weights near 1, angles, output gradients."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, D, generator=gen, dtype=torch.float64)
    weights = 1 + 0.2 * torch.randn(2, D, generator=gen, dtype=torch.float64)
    angles = torch.rand(L, D // 2, generator=gen, dtype=torch.float64) * 2 * torch.pi
    grads = torch.randn(2, B, H, L, D, generator=gen, dtype=torch.float64)
    return qkv, weights, angles.cos(), angles.sin(), grads


def _run(fn, qkv, weights, cos, sin, grads, dtype: torch.dtype, strided: bool):
    """fn's (q_out, k_out) and d(q, k, q_weight, k_weight), inputs cast to dtype (cos/sin float32 or 64)."""
    qkv = qkv.to(DEVICE, dtype).requires_grad_()
    if strided:  # views of a fused qkv projection, as the model produces them
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    else:
        q, k = qkv[:, :, 0].transpose(1, 2).contiguous(), qkv[:, :, 1].transpose(1, 2).contiguous()
    q_weight, k_weight = (w.to(DEVICE, dtype).requires_grad_() for w in weights)
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q_out, k_out = fn(q, k, q_weight, k_weight, cos.to(DEVICE, angle_dtype), sin.to(DEVICE, angle_dtype))
    grad_out = grads.to(DEVICE, dtype)
    d_qkv, dqw, dkw = torch.autograd.grad(
        (q_out, k_out), (qkv, q_weight, k_weight), (grad_out[0], grad_out[1])
    )
    return [q_out, k_out, d_qkv[:, :, 0].transpose(1, 2), d_qkv[:, :, 1].transpose(1, 2), dqw, dkw]


def _check_against_reference(shape, dtype, strided, seed):
    qkv, weights, cos, sin, grads = _inputs(*shape, seed=seed)
    # Every run sees the same dtype-rounded values, so the float64 run measures computation error only.
    qkv, weights, grads = (t.to(dtype).double() for t in (qkv, weights, grads))
    inputs = (qkv, weights, cos.float().double(), sin.float().double(), grads)
    exact = [t.cpu() for t in _run(reference.qk_norm_rope, *inputs, torch.float64, strided)]
    actual = _run(qk_norm_rope, *inputs, dtype, strided)
    same_dtype = _run(reference.qk_norm_rope, *inputs, dtype, strided)
    for name, a, r, e in zip(
        ("q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight"), actual, same_dtype, exact
    ):
        assert a.dtype == dtype and a.shape == e.shape, name
        err = (a.double().cpu() - e).abs().max().item()
        ref_err = (r.double().cpu() - e).abs().max().item()
        assert err <= 2 * ref_err + ATOL[dtype], (
            f"{name}: error {err:.3e} vs PyTorch {dtype} error {ref_err:.3e}"
        )


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "qkv_view"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_float64_reference(dtype, shape, strided):
    _check_against_reference(shape, dtype, strided, seed=2 * SHAPES.index(shape) + strided)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(4, 16, 300, 128)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference_bf16(shape):
    _check_against_reference(shape, torch.bfloat16, strided=True, seed=3)


def test_outputs_are_contiguous_and_weights_may_be_float32():
    qkv, weights, cos, sin, _ = _inputs(1, 2, 17, 32, seed=4)
    q, k = (qkv[:, :, i].transpose(1, 2).half().to(DEVICE) for i in range(2))
    w32 = weights.float().to(DEVICE)
    cos, sin = cos.float().to(DEVICE), sin.float().to(DEVICE)
    q_out, k_out = qk_norm_rope(q, k, w32[0], w32[1], cos, sin)
    assert q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == torch.float16
    expected = reference.qk_norm_rope(q.double(), k.double(), w32[0].double(), w32[1].double(), cos, sin)
    torch.testing.assert_close(q_out.double(), expected[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(k_out.double(), expected[1], atol=2e-3, rtol=2e-3)


def test_registered_in_dispatch():
    assert dispatch.get_op("qk_norm_rope", "triton", torch.device(DEVICE)) is qk_norm_rope


def test_opcheck():
    qkv, weights, cos, sin, grads = _inputs(1, 2, 17, 16, seed=1)
    q, k = (qkv[:, :, i].transpose(1, 2).float().to(DEVICE).requires_grad_() for i in range(2))
    q_weight, k_weight = (w.float().to(DEVICE).requires_grad_() for w in weights)
    cos, sin = cos.float().to(DEVICE), sin.float().to(DEVICE)
    torch.library.opcheck(torch.ops.selfe.qk_norm_rope.default, (q, k, q_weight, k_weight, cos, sin, 1e-6))
    g = grads.float().to(DEVICE)
    bwd_args = (g[0], g[1], q.detach(), k.detach(), q_weight.detach(), k_weight.detach(), cos, sin, 1e-6)
    torch.library.opcheck(torch.ops.selfe.qk_norm_rope_backward.default, bwd_args)


def test_compiles_with_the_custom_op():
    inputs = _inputs(1, 1, 17, 16, seed=2)
    eager = _run(qk_norm_rope, *inputs, torch.float32, True)
    compiled = _run(
        torch.compile(qk_norm_rope, backend="aot_eager", fullgraph=True), *inputs, torch.float32, True
    )
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise():
    q = torch.zeros(1, 2, 5, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    cos = torch.zeros(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k must have"):
        qk_norm_rope(q, q[:, :1], w, w, cos, cos)
    with pytest.raises(ValueError, match="q_weight must have shape"):
        qk_norm_rope(q, q, w[:8], w, cos, cos)
    with pytest.raises(ValueError, match="sin must have shape"):
        qk_norm_rope(q, q, w, w, cos, cos[:4])
    with pytest.raises(ValueError, match="dtype"):
        qk_norm_rope(q.double(), q.double(), w, w, cos, cos)
    with pytest.raises(ValueError, match="head dim must be even"):
        odd = torch.zeros(1, 2, 5, 15, device=DEVICE)
        qk_norm_rope(odd, odd, w[:15], w[:15], cos, cos)
