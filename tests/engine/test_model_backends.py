"""The tiny MMDiT and the Self-E objective run the same math through every backend switch.

- kernel_backend="triton" (adaLN modulation, gated residual, QK RMSNorm + RoPE) against "torch";
- attention_backend="triton_rope" (RoPE fused into flash attention, q/k only RMS-normed) against "sdpa";
- the objective's energy-preserving renorm through kernel_backend="triton" against "torch";
- the rope-fused registry and the per-module loading of kernel providers.

Without CUDA the Triton kernels run in the interpreter (tests/conftest.py), so the sizes are tiny.
Tolerance, the flash-attention way: a backend's float32 error against a float64 oracle may be at
most about twice the float32 error of the reference path.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from selfe.kernels import dispatch, reference
from selfe.method.objective import ObjectiveConfig, SelfELoss
from selfe.method.schedule import TimeShift
from selfe.network import attention as attention_module
from selfe.network.attention import (
    applies_rope,
    attention,
    known_attention_backends,
    register_attention_backend,
    register_rope_attention_backend,
    rope_attention,
)
from selfe.network.config import MMDiTConfig, mmdit_preset
from selfe.network.model import MMDiT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_model(seed: int = 0, **overrides) -> MMDiT:
    """The tiny preset with random weights everywhere (zero-init layers too), so every path matters."""
    torch.manual_seed(seed)
    model = MMDiT(mmdit_preset("tiny", **overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param.shape[1]))  # keeps activations O(1)
            elif name.endswith(("query_weight", "key_weight")):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.to(DEVICE)


def like(model: MMDiT, dtype: torch.dtype = torch.float32, **overrides) -> MMDiT:
    """A model with `model`'s weights in `dtype` and its config changed by `overrides`."""
    other = MMDiT(MMDiTConfig.from_dict({**model.config.to_dict(), **overrides}))
    other.load_state_dict(model.state_dict())
    return other.to(device=DEVICE, dtype=dtype)


def make_inputs(batch: int = 2, txt_len: int = 5, lengths=(5, 2), seed: int = 1):
    """Latents (B, 16, 8, 8) = 16 image tokens, 5 text tokens with the second sample's last 3 padded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=gen)
    t = torch.rand(batch, generator=gen) * 0.9 + 0.05
    s = t * torch.rand(batch, generator=gen)
    mask = torch.arange(txt_len)[None, :] < torch.tensor(lengths)[:, None]
    cond = {
        "txt": torch.randn(batch, txt_len, 32, generator=gen),
        "txt_mask": mask,
        "pooled": torch.randn(batch, 16, generator=gen),
    }
    to = lambda v: v.to(DEVICE)
    return to(x), to(t), to(s), {k: to(v) for k, v in cond.items()}


def forward_backward(model: MMDiT, inputs) -> tuple[Tensor, dict[str, Tensor]]:
    """V and d(sum(V * w))/d(params) for a fixed random w, everything in float64 for comparison."""
    dtype = model.img_in.weight.dtype
    x, t, s, cond = inputs
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    model.zero_grad(set_to_none=True)
    out = model(x.to(dtype), t.to(dtype), s.to(dtype), cond)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out.double() * weight.to(out.device)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    return out.double(), {name: p.grad.double() for name, p in model.named_parameters()}


def assert_as_accurate(got: Tensor, ref32: Tensor, oracle: Tensor, what: str, eps: float = 2**-23) -> None:
    """|got - oracle| <= 2 |ref32 - oracle| + a rounding floor of the dtype's `eps` (max-abs over the tensor)."""
    err = (got - oracle).abs().max().item()
    ref_err = (ref32 - oracle).abs().max().item()
    floor = 4 * eps * oracle.abs().max().item()
    assert err <= 2 * ref_err + floor, f"{what}: error {err:.3g} vs the reference path's {ref_err:.3g}"


def assert_model_matches(fast: MMDiT, reference_model: MMDiT, oracle: MMDiT, inputs) -> None:
    out, grads = forward_backward(fast, inputs)
    out_ref, grads_ref = forward_backward(reference_model, inputs)
    out_64, grads_64 = forward_backward(oracle, inputs)
    assert_as_accurate(out, out_ref, out_64, "V")
    assert grads.keys() == grads_64.keys()
    for name in grads_64:
        assert grads_64[name].abs().max() > 0, f"{name} gets no gradient: the test would not see it"
        assert_as_accurate(grads[name], grads_ref[name], grads_64[name], f"d/d {name}")


# ---------------------------------------------------------------- the model through the backends


def test_triton_kernels_match_torch_kernels_forward_and_backward() -> None:
    from selfe.kernels import modulation, qk_norm_rope

    torch_model = make_model(kernel_backend="torch")
    triton_model = like(torch_model, kernel_backend="triton")
    block = triton_model.double_blocks[0]
    assert block.kernels.qk_norm_rope is qk_norm_rope.qk_norm_rope
    assert block.kernels.gated_residual_modulate is modulation.gated_residual_modulate
    assert triton_model.final_layer.kernels.layer_norm_modulate is modulation.layer_norm_modulate
    assert_model_matches(triton_model, torch_model, like(torch_model, torch.float64), make_inputs())


def test_triton_rope_attention_matches_sdpa_forward_and_backward() -> None:
    sdpa_model = make_model(kernel_backend="torch", attention_backend="sdpa")
    fused_model = like(sdpa_model, attention_backend="triton_rope")
    blocks = [*fused_model.double_blocks, *fused_model.single_blocks]
    assert all(b.rope_in_attention for b in blocks)
    assert not any(b.rope_in_attention for b in [*sdpa_model.double_blocks, *sdpa_model.single_blocks])
    inputs = make_inputs()
    assert not inputs[3]["txt_mask"].all()  # the padded keys must be masked by the kernel too
    assert_model_matches(fused_model, sdpa_model, like(sdpa_model, torch.float64), inputs)


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_cudnn_first_sdpa_matches_sdpa_forward_and_backward(dtype: torch.dtype, backend: str) -> None:
    """sdpa_cudnn, and auto (the default) on CUDA, change only which kernel runs (on the GPU: cuDNN's, with
    the text-padding mask)."""
    sdpa_model = make_model(kernel_backend="torch", attention_backend="sdpa")
    inputs = make_inputs()
    assert not inputs[3]["txt_mask"].all()  # the mask is what keeps flash out
    if dtype == torch.float32:
        cudnn_model = like(sdpa_model, attention_backend=backend)
        assert_model_matches(cudnn_model, sdpa_model, like(sdpa_model, torch.float64), inputs)
        return
    cudnn_model, bf16_sdpa = like(sdpa_model, dtype, attention_backend=backend), like(sdpa_model, dtype)
    out, grads = forward_backward(cudnn_model, inputs)
    out_ref, grads_ref = forward_backward(bf16_sdpa, inputs)
    out_64, grads_64 = forward_backward(like(sdpa_model, torch.float64), inputs)
    eps = torch.finfo(dtype).eps
    assert_as_accurate(out, out_ref, out_64, "V", eps)
    for name in grads_64:
        assert_as_accurate(grads[name], grads_ref[name], grads_64[name], f"d/d {name}", eps)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_backend", ["auto", "triton", "cuda"])
def test_the_model_on_gpu_kernels_is_as_accurate_as_torch_in_bf16(kernel_backend: str) -> None:
    """The whole model on the GPU kernels in bf16, with a gradient (the training choice of `auto`) and
    without one (its forward choice), against the torch kernels, both measured against float64."""
    torch_model = make_model(kernel_backend="torch", attention_backend="auto")
    inputs = make_inputs()
    fast, bf16_torch = (
        like(torch_model, torch.bfloat16, kernel_backend=kernel_backend),
        like(torch_model, torch.bfloat16),
    )
    oracle, eps = like(torch_model, torch.float64), torch.finfo(torch.bfloat16).eps
    out, grads = forward_backward(fast, inputs)
    out_ref, grads_ref = forward_backward(bf16_torch, inputs)
    out_64, grads_64 = forward_backward(oracle, inputs)
    assert_as_accurate(out, out_ref, out_64, "V", eps)
    for name in grads_64:
        assert_as_accurate(grads[name], grads_ref[name], grads_64[name], f"d/d {name}", eps)
    x, t, s, cond = inputs
    cond = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in cond.items()}
    with torch.no_grad():
        out_no_grad = fast(x.to(torch.bfloat16), t.to(torch.bfloat16), s.to(torch.bfloat16), cond).double()
    assert_as_accurate(out_no_grad, out_ref, out_64, "V without a gradient", eps)


def test_a_registered_rope_backend_gets_normed_unrotated_q_k_and_the_joint_table() -> None:
    """The wiring, exactly, with the pure-PyTorch rope attention as the backend (float64, no kernel)."""
    seen = []

    def reference_rope(q, k, v, cos, sin, key_mask):
        seen.append((q.shape, cos.shape, key_mask))
        return reference.rope_attention(q, k, v, cos, sin, key_mask)

    register_rope_attention_backend("test_reference_rope", reference_rope)
    try:
        assert applies_rope("test_reference_rope") and "test_reference_rope" in known_attention_backends()
        sdpa_model = make_model(kernel_backend="torch").double()
        fused_model = like(sdpa_model, torch.float64, attention_backend="test_reference_rope")
        x, t, s, cond = make_inputs()
        cond = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
        with torch.no_grad():
            want = sdpa_model(x.double(), t.double(), s.double(), cond)
            got = fused_model(x.double(), t.double(), s.double(), cond)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        # one call per block, each over the whole [img; txt] sequence with its joint table and mask
        joint = 5 + 16
        assert len(seen) == 2
        for q_shape, cos_shape, key_mask in seen:
            assert q_shape == (2, 4, joint, 16) and cos_shape == (joint, 8) and key_mask.shape == (2, joint)
    finally:
        attention_module._ROPE_REGISTRY.pop("test_reference_rope")


def test_rope_backend_names_and_errors() -> None:
    assert "triton_rope" in known_attention_backends()
    assert applies_rope("triton_rope") and not applies_rope("sdpa")
    assert mmdit_preset("tiny", attention_backend="triton_rope").attention_backend == "triton_rope"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        mmdit_preset("tiny", attention_backend="triton_rope_typo")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        applies_rope("nope")
    q = k = v = torch.randn(1, 2, 3, 4)
    cos = sin = torch.ones(3, 2)
    with pytest.raises(ValueError, match="applies RoPE itself; call rope_attention"):
        attention(q, k, v, backend="triton_rope")
    with pytest.raises(ValueError, match="does not apply RoPE; call attention"):
        rope_attention(q, k, v, cos, sin, backend="sdpa")
    with pytest.raises(ValueError, match=r"cos, sin must be \(L, Dh/2\)"):
        rope_attention(q, k, v, torch.ones(3, 4), sin, backend="triton_rope")
    with pytest.raises(ValueError, match="already registered as a rope-fused backend"):
        register_attention_backend("triton_rope", lambda q, k, v, m: v)
    with pytest.raises(ValueError, match="already registered as a plain backend"):
        register_rope_attention_backend("sdpa", lambda q, k, v, c, s, m: v)


# ---------------------------------------------------------------- the objective's renorm


def objective_loss_and_grads(net: MMDiT, kernel_backend: str) -> tuple[Tensor, dict[str, Tensor]]:
    """One Self-E loss (self-evaluation on half the batch, tau = 1) and its parameter gradients."""
    config = ObjectiveConfig(
        caption_dropout=0.0, time_shift=TimeShift(mu=0.5), tau_warmup=1, aux_start=None, kernel_backend=kernel_backend
    )
    x, _, _, cond = make_inputs(batch=4, lengths=(5, 2, 4, 1))
    null = {"txt": torch.zeros_like(cond["txt"]), "txt_mask": torch.ones_like(cond["txt_mask"]),
            "pooled": torch.zeros_like(cond["pooled"])}  # fmt: skip
    batch = {"x0": x, "cond": cond, "null_cond": null}
    net.zero_grad(set_to_none=True)
    loss, metrics = SelfELoss(config)(net, copy.deepcopy(net), batch, 10, torch.Generator(DEVICE).manual_seed(5))
    assert metrics["lambda_mean"].item() > 0  # the renorm really mixes x_self into the target
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}


def test_objective_renorm_through_triton_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    triton_mix = dispatch.get_op("energy_preserving_mix", "triton", torch.device(DEVICE))
    calls = []

    def counting_mix(*args, **kwargs):
        calls.append(args[0].shape)
        return triton_mix(*args, **kwargs)

    monkeypatch.setitem(dispatch._REGISTRY["energy_preserving_mix"], "triton", counting_mix)
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # resolved afresh: the counting stand-in
    net = make_model(kernel_backend="torch")
    loss_ref, grads_ref = objective_loss_and_grads(net, "torch")
    assert not calls
    loss, grads = objective_loss_and_grads(net, "triton")
    assert calls == [(2, 16, 8, 8)]  # the target of the 2 self-evaluated samples
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


# ---------------------------------------------------------------- kernel providers load independently


def test_one_provider_module_failing_costs_only_its_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfe.kernels import modulation

    missing = "selfe.kernels.no_such_module"
    monkeypatch.setitem(dispatch._PROVIDERS["triton"], "energy_preserving_mix", missing)
    monkeypatch.delitem(dispatch._REGISTRY["energy_preserving_mix"], "triton", raising=False)
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device type is read
    # the other triton modules still load and serve their ops
    assert dispatch.get_op("layer_norm_modulate", "triton", cpu) is modulation.layer_norm_modulate
    # asked for by name: the import error of the op's own module
    with pytest.raises(ModuleNotFoundError, match=missing):
        dispatch.get_op("energy_preserving_mix", "triton", cpu)
    # auto: quietly the next preference
    for use in ("forward", "training"):
        monkeypatch.setitem(dispatch.AUTO_PREFERENCE[use], "energy_preserving_mix", ("triton", "torch"))
    assert dispatch.get_op("energy_preserving_mix", "auto", cuda) is reference.energy_preserving_mix
    # an op a backend has no module for is a clear error, not an import
    with pytest.raises(RuntimeError, match="has no implementation of 'qk_norm_rope'"):
        dispatch.get_op("qk_norm_rope", "cuda", cuda)


def test_auto_on_cuda_picks_the_forward_kernel_without_a_gradient_and_the_training_one_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench/kernels.py found the fastest forward is not the fastest forward + backward: `auto` picks per
    call. Stand-in implementations record which one ran (only the device type is read)."""
    ran = []

    def stand_in(name):
        def impl(x, y, a, b):
            ran.append(name)
            return reference.energy_preserving_mix(x, y, a, b)

        return impl

    op = "energy_preserving_mix"
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setitem(dispatch._REGISTRY, op, {"torch": stand_in("torch"), "triton": stand_in("triton"),
                                                 "cuda": stand_in("cuda")})  # fmt: skip
    monkeypatch.setitem(dispatch._PROVIDERS["triton"], op, "selfe.kernels.reference")  # loads, registers none
    monkeypatch.setitem(dispatch._PROVIDERS["cuda"], op, "selfe.kernels.reference")
    monkeypatch.setitem(dispatch.AUTO_PREFERENCE["forward"], op, ("triton", "torch"))
    monkeypatch.setitem(dispatch.AUTO_PREFERENCE["training"], op, ("cuda", "torch"))
    mix = dispatch.get_op(op, "auto", torch.device("cuda"))
    assert dispatch.get_op(op, "auto", torch.device("cuda")) is mix  # resolved once
    x, y, a, b = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2), torch.full((2,), 0.5)
    leaf = x.clone().requires_grad_()

    mix(leaf, y, a, b)  # a gradient, eager
    with torch.no_grad():
        mix(leaf, y, a, b)  # sampling, self-evaluation passes
    mix(x, y, a, b)  # nothing requires a gradient
    assert ran == ["cuda", "triton", "triton"]
    ran.clear()
    compiled = torch.compile(lambda *args: mix(*args), backend="eager", fullgraph=True)
    compiled(leaf, y, a, b)  # a gradient under torch.compile: the reference, for inductor to fuse
    assert ran == ["torch"]
    # on the CPU, `auto` is the reference itself
    assert dispatch.get_op(op, "auto", torch.device("cpu")) is dispatch._REGISTRY[op]["torch"]
