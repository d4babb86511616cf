"""layer_norm_modulate and gated_residual_modulate kernels against the float64 PyTorch reference.

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
SHAPES = [(1, 1, 48), (3, 7, 80), (2, 33, 130)]  # (B, L, D): ragged D, L = 1, B = 1
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
EPS = 1e-6


def _seed(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, mean: float = 0.0, std: float = 1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean).to(DEVICE, dtype)


def _impl(op: str, backend: str):
    if backend == "cuda":
        try:
            import selfe.kernels.cuda_ops  # noqa: F401
        except ImportError as err:
            pytest.skip(f"CUDA extension selfe._C not built: {err}")
    return dispatch.get_op(op, backend, DEVICE)


def _forward_backward(fn, inputs: list[torch.Tensor], grads_out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of fn followed by the grads of every input, for the given output grads."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, EPS)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + list(grads)


def _check_op(op: str, backend: str, inputs: list[torch.Tensor], grads_out: list[torch.Tensor], names, dtype):
    ref_fn = getattr(reference, op)
    ref64 = _forward_backward(ref_fn, [t.double() for t in inputs], [g.double() for g in grads_out])
    torch_same = _forward_backward(ref_fn, inputs, grads_out)
    kernel = _forward_backward(_impl(op, backend), inputs, grads_out)
    assert_within_torch_error(kernel, torch_same, ref64, names, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_modulate(shape, dtype, backend):
    B, L, D = shape
    gen = _seed("lnm", shape, dtype)
    x = _randn(gen, B, L, D, dtype=dtype, mean=0.5, std=2.0)  # a nonzero mean exercises the centring
    shift = _randn(gen, B, D, dtype=dtype, std=0.5)
    scale = _randn(gen, B, D, dtype=dtype, std=0.5)
    grad = _randn(gen, B, L, D, dtype=dtype)
    names = ["out", "dx", "dshift", "dscale"]
    _check_op("layer_norm_modulate", backend, [x, shift, scale], [grad], names, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_modulate(shape, dtype, backend):
    B, L, D = shape
    gen = _seed("grm", shape, dtype)
    x = _randn(gen, B, L, D, dtype=dtype, mean=0.5, std=2.0)
    y = _randn(gen, B, L, D, dtype=dtype)
    gate, shift, scale = (_randn(gen, B, D, dtype=dtype, std=0.5) for _ in range(3))
    grads = [_randn(gen, B, L, D, dtype=dtype), _randn(gen, B, L, D, dtype=dtype)]  # of x' and of the output
    names = ["x_new", "out", "dx", "dgate", "dy", "dshift", "dscale"]
    _check_op("gated_residual_modulate", backend, [x, gate, y, shift, scale], grads, names, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_conditioning_matches_contiguous(backend):
    """shift/scale/gate as chunks of one (B, 3D) modulation tensor, as FLUX produces them."""
    gen = _seed("strided")
    x, y = _randn(gen, 2, 5, 64, dtype=torch.float32), _randn(gen, 2, 5, 64, dtype=torch.float32)
    mod = _randn(gen, 2, 3 * 64, dtype=torch.float32)
    gate, shift, scale = mod.chunk(3, dim=-1)
    fn = _impl("gated_residual_modulate", backend)
    got = fn(x, gate, y, shift, scale)
    want = fn(x, gate.contiguous(), y, shift.contiguous(), scale.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    lnm = _impl("layer_norm_modulate", backend)
    torch.testing.assert_close(lnm(x, shift, scale), lnm(x, shift.contiguous(), scale.contiguous()), rtol=0, atol=0)


def test_dispatch_returns_triton_and_reference():
    from selfe.kernels import modulation

    for op in ("layer_norm_modulate", "gated_residual_modulate"):
        assert dispatch.get_op(op, "triton", DEVICE) is getattr(modulation, op)
        assert dispatch.get_op(op, "torch", DEVICE) is getattr(reference, op)


def test_environment_picks_the_backend_where_the_config_leaves_it_to_auto(monkeypatch):
    """The config default is `auto`; SELFE_KERNEL_BACKEND then decides. A name in the config wins."""
    from selfe.kernels import modulation

    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    for asked in (None, "auto"):
        assert dispatch.get_op("layer_norm_modulate", asked, DEVICE) is modulation.layer_norm_modulate
    assert dispatch.get_op("layer_norm_modulate", "torch", DEVICE) is reference.layer_norm_modulate
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="SELFE_KERNEL_BACKEND"):
        dispatch.get_op("layer_norm_modulate", "auto", DEVICE)


def test_opcheck_custom_ops():
    _impl("layer_norm_modulate", "triton")  # registers the ops
    gen = _seed("opcheck")
    x, y = _randn(gen, 2, 3, 40, dtype=torch.float32), _randn(gen, 2, 3, 40, dtype=torch.float32)
    gate, shift, scale = (_randn(gen, 2, 40, dtype=torch.float32) for _ in range(3))
    leaves = [t.requires_grad_() for t in (x, gate, y, shift, scale)]
    x, gate, y, shift, scale = leaves
    torch.library.opcheck(torch.ops.selfe.layer_norm_modulate.default, (x, shift, scale, EPS))
    torch.library.opcheck(torch.ops.selfe.gated_residual_modulate.default, (x, gate, y, shift, scale, EPS))


def test_compiles_without_graph_break():
    fn = _impl("gated_residual_modulate", "triton")
    gen = _seed("compile")
    x, y = _randn(gen, 2, 3, 48, dtype=torch.float32), _randn(gen, 2, 3, 48, dtype=torch.float32)
    gate, shift, scale = (_randn(gen, 2, 48, dtype=torch.float32) for _ in range(3))
    leaves = [t.requires_grad_() for t in (x, gate, y, shift, scale)]
    compiled = torch.compile(lambda *a: fn(*a, EPS), fullgraph=True, backend="aot_eager")
    x_new, out = compiled(*leaves)
    grads = torch.autograd.grad((x_new.sum() + (out * out).sum()), leaves)
    x_new_e, out_e = fn(*leaves, EPS)
    grads_e = torch.autograd.grad((x_new_e.sum() + (out_e * out_e).sum()), leaves)
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


def test_bad_inputs_raise_clear_errors():
    fn = _impl("layer_norm_modulate", "triton")
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="shift must be"):
        fn(x, torch.randn(2, 9, device=DEVICE), torch.randn(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"x must be \(B, L, D\)"):
        fn(x[0], torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="not supported"):
        fn(x.double(), torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE))
    gated = _impl("gated_residual_modulate", "triton")
    with pytest.raises(ValueError, match="y must match x"):
        s = torch.randn(2, 8, device=DEVICE)
        gated(x, s, torch.randn(2, 4, 8, device=DEVICE), s, s)


def test_importing_dispatch_does_not_import_triton():
    """triton loads only when a triton backend is asked for, so `import selfe.kernels` works without it."""
    import subprocess
    import sys

    code = (
        "import sys, selfe.kernels, selfe.kernels.dispatch as d, torch\n"
        "d.get_op('layer_norm_modulate', 'auto', torch.device('cpu'))\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
