"""Triton RoPE flash attention vs the float64 reference, forward and backward.

Tolerance the flash-attention way: the kernel's error against float64 may be at most twice that of
PyTorch computing the same attention in the same dtype, plus a tiny atol. Without CUDA the kernels run
through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

from selfe.kernels import reference
from selfe.kernels.rope_attention import fused_rope_attention, rope_flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The atol only covers errors of a few float32 roundings where PyTorch's own error is exactly zero
# (e.g. a row attending a single key has d(scores) = 0 exactly in PyTorch, ~1e-7 in the kernel).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}

SHAPES = [(1, 2, 1, 16), (2, 2, 17, 32), (2, 1, 45, 64), (1, 2, 70, 16)]  # (B, H, L, Dh): ragged L


def _inputs(B: int, H: int, L: int, D: int, seed: int, masked: bool):
    """Strided q, k, v views of a (B, L, 3, H, Dh) qkv tensor (float64), angles, a text-style key mask."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, D, generator=gen, dtype=torch.float64)
    angles = torch.rand(L, D // 2, generator=gen, dtype=torch.float64) * 2 * torch.pi
    grad_out = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    mask = None
    if masked:
        # Joint sequence = text then image; text padding is masked, image keys always attend.
        text = max(1, L // 3)
        lengths = torch.randint(1, text + 1, (B,), generator=gen)
        mask = torch.ones(B, L, dtype=torch.bool)
        for i, n in enumerate(lengths.tolist()):
            mask[i, n:text] = False
        mask[0] = False  # sample 0 keeps a single key
        mask[0, int(torch.randint(0, L, (1,), generator=gen))] = True
    return qkv, angles.cos(), angles.sin(), mask, grad_out


def _run(fn, qkv: torch.Tensor, cos, sin, mask, grad_out, dtype: torch.dtype):
    """fn's output and d(q, k, v) for inputs cast to dtype (cos/sin float32 unless float64)."""
    qkv = qkv.to(DEVICE, dtype).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = cos.to(DEVICE, angle_dtype), sin.to(DEVICE, angle_dtype)
    mask = None if mask is None else mask.to(DEVICE)
    out = fn(q, k, v, cos, sin, mask)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad_out.to(DEVICE, dtype))
    return [out] + [grad_qkv[:, :, i].transpose(1, 2) for i in range(3)]


def _torch_same_dtype(q, k, v, cos, sin, key_mask):
    """PyTorch attention computed in the inputs' dtype (matmuls and softmax), as FlashAttention's tests do."""
    q_rot, k_rot = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
    scores = (q_rot @ k_rot.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _assert_flash_close(actual, same_dtype, exact, dtype, names=("out", "dq", "dk", "dv")):
    for name, a, r, e in zip(names, actual, same_dtype, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        err = (a.double().cpu() - e).abs().max().item()
        ref_err = (r.double().cpu() - e).abs().max().item()
        assert err <= 2 * ref_err + ATOL[dtype], f"{name}: error {err:.3e} vs PyTorch {dtype} error {ref_err:.3e}"


def _check_against_reference(shape, dtype, masked, seed):
    qkv, cos, sin, mask, grad_out = _inputs(*shape, seed=seed, masked=masked)
    # Every run sees the same dtype-rounded values, so the float64 run measures computation error only.
    qkv, grad_out = qkv.to(dtype).double(), grad_out.to(dtype).double()
    cos, sin = cos.float().double(), sin.float().double()
    exact = _run(reference.rope_attention, qkv, cos, sin, mask, grad_out, torch.float64)
    actual = _run(rope_flash_attention, qkv, cos, sin, mask, grad_out, dtype)
    same_dtype = _run(_torch_same_dtype, qkv, cos, sin, mask, grad_out, dtype)
    _assert_flash_close(actual, same_dtype, [t.cpu() for t in exact], dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_float64_reference(dtype, shape, masked):
    _check_against_reference(shape, dtype, masked, seed=2 * SHAPES.index(shape) + masked)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES + [(2, 4, 300, 128)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference_bf16(shape, masked):
    _check_against_reference(shape, torch.bfloat16, masked, seed=7)


def test_reference_equals_sdpa_on_rotated_inputs():
    qkv, cos, sin, mask, _ = _inputs(2, 2, 17, 16, seed=3, masked=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        reference.apply_rope(q, cos, sin),
        reference.apply_rope(k, cos, sin),
        v,
        attn_mask=mask[:, None, None, :],
    )
    torch.testing.assert_close(reference.rope_attention(q, k, v, cos, sin, mask), expected)


def test_sample_without_keys_gives_zero_output_and_finite_grads():
    qkv, cos, sin, _, grad_out = _inputs(2, 1, 17, 16, seed=5, masked=False)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1] = False
    for fn in (reference.rope_attention, rope_flash_attention):
        out, dq, dk, dv = _run(fn, qkv, cos, sin, mask, grad_out, torch.float32)
        assert torch.all(out[1] == 0) and out[0].abs().sum() > 0
        for grad in (dq, dk, dv):
            assert torch.isfinite(grad).all() and torch.all(grad[1] == 0)


def test_sm_scale_and_backend_entry():
    qkv, cos, sin, mask, _ = _inputs(1, 2, 17, 32, seed=11, masked=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2).float().to(DEVICE) for i in range(3))
    cos, sin, mask = cos.float().to(DEVICE), sin.float().to(DEVICE), mask.to(DEVICE)
    out = rope_flash_attention(q, k, v, cos, sin, mask, sm_scale=0.3)
    expected = reference.rope_attention(q.double(), k.double(), v.double(), cos.double(), sin.double(), mask, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        fused_rope_attention(q, k, v, cos, sin, mask), rope_flash_attention(q, k, v, cos, sin, mask)
    )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_opcheck(masked):
    qkv, cos, sin, mask, grad_out = _inputs(1, 2, 17, 16, seed=1, masked=masked)
    q, k, v = (qkv[:, :, i].transpose(1, 2).float().to(DEVICE).requires_grad_() for i in range(3))
    cos, sin = cos.float().to(DEVICE), sin.float().to(DEVICE)
    mask = None if mask is None else mask.to(DEVICE)
    args = (q, k, v, cos, sin, mask, 0.25)
    torch.library.opcheck(torch.ops.selfe.rope_flash_attention.default, args)
    out, lse = torch.ops.selfe.rope_flash_attention(*args)
    bwd_args = (
        grad_out.float().to(DEVICE),
        q.detach(),
        k.detach(),
        v.detach(),
        cos,
        sin,
        mask,
        out.detach(),
        lse,
        0.25,
    )
    torch.library.opcheck(torch.ops.selfe.rope_flash_attention_backward.default, bwd_args)


def test_compiles_with_the_custom_op():
    qkv, cos, sin, mask, grad_out = _inputs(1, 1, 17, 16, seed=2, masked=True)
    eager = _run(rope_flash_attention, qkv, cos, sin, mask, grad_out, torch.float32)
    compiled_fn = torch.compile(rope_flash_attention, backend="aot_eager", fullgraph=True)
    compiled = _run(compiled_fn, qkv, cos, sin, mask, grad_out, torch.float32)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise():
    q = torch.zeros(1, 2, 5, 16, device=DEVICE)
    cos = torch.zeros(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k must have"):
        rope_flash_attention(q, q[:, :1], q, cos, cos)
    with pytest.raises(ValueError, match="cos must have shape"):
        rope_flash_attention(q, q, q, cos[:, :4], cos)
    with pytest.raises(ValueError, match="key_mask must be a bool"):
        rope_flash_attention(q, q, q, cos, cos, key_mask=torch.ones(1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="head dim must be even"):
        odd = torch.zeros(1, 2, 5, 15, device=DEVICE)
        rope_flash_attention(odd, odd, odd, cos, cos)
    with pytest.raises(ValueError, match="dtype"):
        rope_flash_attention(q, q.double(), q, cos, cos)


def test_quick_autotune_keeps_the_first_and_the_last_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfe.kernels import rope_attention

    monkeypatch.delenv(rope_attention.AUTOTUNE_ENV, raising=False)  # the GPU tests run with it set to quick
    monkeypatch.setattr(rope_attention, "interpreting", lambda: False)  # the GPU lists, not the interpreter's
    tiles = [(128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
    blocks = lambda configs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]
    assert blocks(rope_attention._configs(tiles)) == tiles
    monkeypatch.setenv(rope_attention.AUTOTUNE_ENV, "quick")
    assert blocks(rope_attention._configs(tiles)) == [tiles[0], tiles[-1]]
    monkeypatch.setenv(rope_attention.AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match="SELFE_TRITON_AUTOTUNE='fast'; use full or quick"):
        rope_attention._configs(tiles)
