"""energy_preserving_mix kernels against the float64 PyTorch reference.

Tolerance the flash-attention way: a kernel's max error against the reference run in float64 may be at
most twice PyTorch's own error (the reference run in the kernel's dtype) plus half an ulp at the output's
largest magnitude. Triton runs through the interpreter on CPU (conftest sets TRITON_INTERPRET); bf16 and
the CUDA C++ backend need a GPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from selfe.kernels import dispatch, reference
from tests.kernels.tolerance import assert_within_torch_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (B, ...): 2-D and 4-D, a sample smaller than a tile, and N = 2100 spanning several tiles and chunks.
SHAPES = [(1, 48), (3, 4, 9, 11), (1, 2100), (2, 3, 7, 13)]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
EPS = 1e-12


def _seed(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(DEVICE, dtype)


def _impl(backend: str):
    if backend == "cuda":
        try:
            import selfe.kernels.cuda_ops  # noqa: F401
        except ImportError as err:
            pytest.skip(f"CUDA extension selfe._C not built: {err}")
    return dispatch.get_op("energy_preserving_mix", backend, DEVICE)


def _forward_backward(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, EPS)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def _check(backend: str, inputs: list[torch.Tensor], grad: torch.Tensor, dtype: torch.dtype) -> None:
    ref = reference.energy_preserving_mix
    ref64 = _forward_backward(ref, [t.double() for t in inputs], grad.double())
    torch_same = _forward_backward(ref, inputs, grad)
    kernel = _forward_backward(_impl(backend), inputs, grad)
    assert_within_torch_error(kernel, torch_same, ref64, ["out", "dp", "dq", "da", "db"], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_energy_preserving_mix(shape, dtype, backend):
    gen = _seed("mix", shape, dtype)
    B = shape[0]
    p, q, grad = (
        _randn(gen, *shape, dtype=dtype),
        _randn(gen, *shape, dtype=dtype),
        _randn(gen, *shape, dtype=dtype),
    )
    # a, b in float32 as the objective and the sampler pass them (CFG-like: a = omega, b = 1 - omega).
    a = _randn(gen, B, dtype=torch.float32, std=2.0)
    b = 1 - a
    _check(backend, [p, q, a, b], grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_samples(backend):
    """A zero p (ratio 0, norm gradient masked as torch does) and b = 0 (the s = t target: out = p)."""
    gen = _seed("degenerate")
    p, q, grad = (_randn(gen, 3, 5, 7, dtype=torch.float32) for _ in range(3))
    p[0] = 0
    a = torch.tensor([1.0, 1.0, 0.7], device=DEVICE)
    b = torch.tensor([0.3, 0.0, 0.3], device=DEVICE)
    _check(backend, [p, q, a, b], grad, torch.float32)
    out = _impl(backend)(p, q, a, b)
    assert out[0].abs().max() == 0
    torch.testing.assert_close(out[1], p[1], rtol=1e-6, atol=1e-6)


def test_dispatch_returns_triton_and_reference():
    from selfe.kernels import renorm

    assert dispatch.get_op("energy_preserving_mix", "triton", DEVICE) is renorm.energy_preserving_mix
    assert dispatch.get_op("energy_preserving_mix", "torch", DEVICE) is reference.energy_preserving_mix


def test_opcheck_and_compile():
    fn = _impl("triton")
    gen = _seed("opcheck")
    p, q = (_randn(gen, 2, 3, 5, dtype=torch.float32).requires_grad_() for _ in range(2))
    a, b = (_randn(gen, 2, dtype=torch.float32).requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.selfe.energy_preserving_mix.default, (p, q, a, b, EPS))
    compiled = torch.compile(lambda *t: fn(*t, EPS), fullgraph=True, backend="aot_eager")
    out = compiled(p, q, a, b)
    grads = torch.autograd.grad((out * out).sum(), (p, q, a, b))
    out_e = fn(p, q, a, b, EPS)
    grads_e = torch.autograd.grad((out_e * out_e).sum(), (p, q, a, b))
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


def test_bad_inputs_raise_clear_errors():
    fn = _impl("triton")
    p = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="q must match p"):
        fn(p, torch.randn(2, 3, 5, device=DEVICE), torch.ones(2, device=DEVICE), torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"b must be \(B,\)"):
        fn(p, p, torch.ones(2, device=DEVICE), torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="not supported"):
        fn(p.double(), p.double(), torch.ones(2, device=DEVICE), torch.ones(2, device=DEVICE))
