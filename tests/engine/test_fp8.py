"""FP8 behind one switch (selfe.components.fp8), the optional-library probes (selfe.utils.optional), bench/fp8.py.

On CPU torchao emulates the FP8 GEMM: inputs and weights really are rounded to e4m3 with dynamic scales,
only the multiply runs in high precision, so the numerical claims below are tested for real.

The error bound. e4m3 keeps 3 mantissa bits: round-to-nearest leaves a relative error |d| <= u = 2^-4 per
element (normal range; tensorwise/rowwise scaling maps each amax to 448, so every element within 2^-14
of its amax stays normal). A dot product y = sum_k x_k w_k of K rounded pairs then errs by
sum_k x_k w_k (d_k + e_k) (to first order). The rounding errors are zero-mean and independent across k,
each with rms <= u / sqrt(3) (uniform on [-u, u] is the worst case at the bottom of a binade), so
    rms(err) <= sqrt(2/3) u * S,   S = sqrt(sum_k (x_k w_k)^2)
whatever K: the absolute error grows like sqrt(K) * u * |x||w|, like the output itself when the terms do
not cancel, so the relative error does not grow with K. We test the error normalised by each output's S
against eps = sqrt(2/3) * 2^-4 = 0.051 with a 2x margin; the measured value sits near 0.037 (the actual
rounding rms is about 0.0265 per operand). For the whole network, the bound is the output error the
same model shows when every converted linear gets independent Gaussian noise of rms eps * S added to its
output (the noise model above, pushed through the network itself), again with a 2x margin.
"""

from __future__ import annotations

import copy
import math
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfe.components.fp8 import (
    FP8Config,
    convert_for_inference,
    convert_for_training,
    converted_modules,
    fp8_autocast_context,
    fp8_plan,
    high_precision_state_dict,
    load_high_precision_state_dict,
    post_optimizer_step,
)
from selfe.network.config import mmdit_preset
from selfe.network.model import MMDiT
from selfe.utils import optional
from selfe.utils.optional import torchao_available, transformer_engine_available, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
E4M3_UNIT_ROUNDOFF = 2.0**-4
FP8_DOT_RMS = math.sqrt(2.0 / 3.0) * E4M3_UNIT_ROUNDOFF  # rms error of one FP8 dot product, in units of S
MARGIN = 2.0

needs_torchao = pytest.mark.skipif(
    not torchao_available(), reason=f"torchao not importable: {unavailable_reason('torchao')}"
)
TE_SKIP_REASON = (
    f"Transformer Engine not importable: {unavailable_reason('transformer_engine')}"
    if not transformer_engine_available()
    else "Transformer Engine needs a CUDA device"
)
needs_te = pytest.mark.skipif(not (transformer_engine_available() and torch.cuda.is_available()), reason=TE_SKIP_REASON)

# The tiny preset's linears that must go FP8 (every dim a multiple of 16: 64, 192, 256, 320, 448).
EXPECTED_FP8 = sorted(
    [f"double_blocks.0.{s}_attn.{p}" for s in ("img", "txt") for p in ("qkv", "proj")]
    + [f"double_blocks.0.{s}_mlp.{i}" for s in ("img", "txt") for i in (0, 2)]
    + ["single_blocks.0.linear1", "single_blocks.0.linear2"]
)


def make_model(seed: int = 0) -> MMDiT:
    """Tiny MMDiT with random weights everywhere (adaLN-Zero's zeros would switch every block off)."""
    torch.manual_seed(seed)
    model = MMDiT(mmdit_preset("tiny"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif name.endswith(("query_weight", "key_weight")):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model


def make_inputs(batch: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=gen).to(dtype)
    t = torch.rand(batch, generator=gen) * 0.8 + 0.1
    cond = {
        "txt": torch.randn(batch, 8, 32, generator=gen).to(dtype),
        "txt_mask": None,
        "pooled": torch.randn(batch, 16, generator=gen).to(dtype),
    }
    return x, t, 0.5 * t, cond


def torchao_config(**overrides) -> FP8Config:
    return FP8Config(recipe="torchao", **overrides)


def incoherent_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S = sqrt(sum_k (x_k w_jk)^2) per output element, in float64. x: (..., K), weight: (N, K)."""
    return torch.sqrt(x.double().square() @ weight.double().square().T)


# ---------------------------------------------------------------------------------------------- config


def test_config_validation_and_round_trip():
    for bad in (
        dict(recipe="fp8"),
        dict(scaling="blockwise"),
        dict(min_features=0),
        dict(include=()),
        dict(emulate="yes"),
        dict(fsdp_float8_all_gather=1),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FP8Config(**bad)
    config = torchao_config(scaling="rowwise", include=["*linear1"], min_features=32)
    assert FP8Config.from_dict(config.to_dict()) == config and config.include == ("*linear1",)
    with pytest.raises(ValueError, match="unknown FP8Config keys"):
        FP8Config.from_dict({"recipe": "torchao", "scalling": "rowwise"})
    assert not config.float8_all_gather  # FP8 all-gather is tensorwise only
    assert torchao_config().float8_all_gather


def test_plan_selects_only_large_projections_and_says_why():
    model = make_model()
    plan = fp8_plan(model, torchao_config())
    assert sorted(name for name, why in plan.items() if why == "fp8") == EXPECTED_FP8
    assert "excluded" in plan["double_blocks.0.img_mod.lin"]
    assert "excluded" in plan["single_blocks.0.modulation.lin"]
    assert "excluded" in plan["final_layer.linear"] and "excluded" in plan["img_in"]
    # size rules: min_features, and the FP8 GEMM's multiple-of-16 constraint
    plan = fp8_plan(model, torchao_config(min_features=128))
    assert "below min_features" in plan["double_blocks.0.img_attn.proj"]  # 64 x 64
    odd = nn.Sequential(nn.Linear(64, 24))
    assert "multiples of 16" in fp8_plan(odd, torchao_config(include=("*",)))["0"]
    with pytest.raises(ValueError, match="selects no linear"):
        convert_for_training(make_model(), torchao_config(include=("nothing",)))


def test_none_recipe_is_a_no_op():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    assert convert_for_training(model, FP8Config()) is model
    assert convert_for_inference(model, FP8Config()) is model
    assert converted_modules(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with fp8_autocast_context(FP8Config()):
        pass


# ---------------------------------------------------------------------------------------------- torchao


@needs_torchao
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_filter_converts_projections_and_leaves_the_rest_untouched(scaling):
    reference = make_model()
    model = convert_for_training(copy.deepcopy(reference), torchao_config(scaling=scaling))
    assert sorted(converted_modules(model)) == EXPECTED_FP8
    modules = dict(model.named_modules())
    for name, ref_module in reference.named_modules():
        if not isinstance(ref_module, nn.Linear):
            continue
        module = modules[name]
        if name in EXPECTED_FP8:
            assert type(module).__name__ == "Float8Linear"
        else:  # untouched: the very type, and the weights bit for bit
            assert type(module) is nn.Linear, name
        assert torch.equal(module.weight.detach(), ref_module.weight.detach()), name
        assert torch.equal(module.bias.detach(), ref_module.bias.detach()), name


@needs_torchao
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_each_fp8_linear_within_the_e4m3_dot_product_bound(scaling):
    """Per converted linear, on its real inputs: rms(err / S) <= 2 * sqrt(2/3) * 2^-4 (module docstring)."""
    model = convert_for_training(make_model(), torchao_config(scaling=scaling))
    seen = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))
        )
        for name in EXPECTED_FP8
    ]
    with torch.no_grad():
        model(*make_inputs())
    for hook in hooks:
        hook.remove()
    assert sorted(seen) == EXPECTED_FP8
    for name, (x, out) in seen.items():
        linear = model.get_submodule(name)
        exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        normalised = (out.double() - exact) / incoherent_scale(x, linear.weight)
        rms = normalised.square().mean().sqrt().item()
        assert rms <= MARGIN * FP8_DOT_RMS, f"{name}: rms {rms:.4f} > {MARGIN} * {FP8_DOT_RMS:.4f}"
        # and FP8 really is in effect: fp32 would be ~1e-7, far below a quarter of the e4m3 rounding
        assert rms >= FP8_DOT_RMS / 4, f"{name}: rms {rms:.2e} is too small for e4m3 rounding"


def noise_model_error(reference: MMDiT, inputs, seed: int = 0) -> float:
    """Output relative error when each FP8-selected linear's output gets N(0, (eps * S)^2) noise."""
    gen = torch.Generator().manual_seed(seed)

    def add_noise(module, args, out):
        scale = incoherent_scale(args[0], module.weight).float()
        return out + FP8_DOT_RMS * scale * torch.randn(out.shape, generator=gen)

    noisy = copy.deepcopy(reference)
    for name in EXPECTED_FP8:
        noisy.get_submodule(name).register_forward_hook(add_noise)
    with torch.no_grad():
        exact, perturbed = reference(*inputs), noisy(*inputs)
    return ((perturbed - exact).norm() / exact.norm()).item()


@needs_torchao
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_model_forward_within_the_propagated_fp8_bound(scaling):
    reference, inputs = make_model(), make_inputs()
    model = convert_for_training(copy.deepcopy(reference), torchao_config(scaling=scaling))
    with torch.no_grad():
        exact, out = reference(*inputs), model(*inputs)
    error = ((out - exact).norm() / exact.norm()).item()
    bound = MARGIN * noise_model_error(reference, inputs)
    assert 0 < error <= bound, f"relative error {error:.3e} > bound {bound:.3e}"


@needs_torchao
def test_bf16_forward_and_backward_run():
    model = convert_for_training(make_model().to(torch.bfloat16), torchao_config())
    x, t, s, cond = make_inputs(dtype=torch.bfloat16)
    out = model(x, t, s, cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name in EXPECTED_FP8:
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@needs_torchao
def test_loss_falls_over_a_few_steps_on_a_fixed_batch():
    model = convert_for_training(make_model(), torchao_config(fsdp_float8_all_gather=False))
    x, t, s, cond = make_inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(model(x, t, s, cond), target)
        loss.backward()
        for name in EXPECTED_FP8:
            assert torch.isfinite(model.get_submodule(name).weight.grad).all()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        post_optimizer_step(model, torchao_config())  # unsharded: a no-op that must not fail
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


@needs_torchao
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_checkpoints_stay_high_precision_and_load_both_ways(scaling, tmp_path):
    from safetensors.torch import load_file, save_file

    reference = make_model()
    model = convert_for_training(copy.deepcopy(reference), torchao_config(scaling=scaling))
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert {k: v.dtype for k, v in sd.items()} == {k: v.dtype for k, v in ref_sd.items()}
    plain = high_precision_state_dict(model)
    assert all(type(v) is torch.Tensor for v in plain.values())  # torchao's weight wrapper unwrapped
    save_file(plain, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    fresh = MMDiT(mmdit_preset("tiny"))
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], ref_sd[k]) for k in ref_sd)
    other = convert_for_training(MMDiT(mmdit_preset("tiny")), torchao_config(scaling=scaling))
    other.load_state_dict(ref_sd, strict=True)  # an ordinary checkpoint into a converted model
    load_high_precision_state_dict(other, loaded)  # the same through the helper (TE-tolerant)
    with pytest.raises(KeyError, match="missing"):
        load_high_precision_state_dict(other, {k: v for k, v in loaded.items() if k != "img_in.weight"})
    x = make_inputs()
    with torch.no_grad():
        assert torch.equal(other(*x), model(*x))


@needs_torchao
def test_compiled_converted_block_matches_eager():
    """torch.compile with backend="aot_eager" (traces forward and backward; inductor works too, ~25 s)."""
    model = convert_for_training(make_model(), torchao_config())
    block = model.single_blocks[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 64, generator=gen, requires_grad=True)
    vec = torch.randn(2, 64, generator=gen)
    from selfe.network.rope import joint_rope_tables

    cos, sin = joint_rope_tables(8, 4, 4, model.config.axes_dim, model.config.rope_theta, device=x.device)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, vec, cos, sin)
    (grad_compiled,) = torch.autograd.grad(out.square().sum(), x)
    eager = block(x, vec, cos, sin)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)


@needs_torchao
def test_inference_conversion_on_cpu_emulates_the_same_quantisation():
    """On CPU quantize_'s float8 config refuses to run (it asserts sm89+): sampling uses emulated Float8Linear."""
    reference, inputs = make_model(), make_inputs()
    model = convert_for_inference(copy.deepcopy(reference), torchao_config())
    assert sorted(converted_modules(model)) == EXPECTED_FP8
    with torch.no_grad():
        exact, out = reference(*inputs), model(*inputs)
    error = ((out - exact).norm() / exact.norm()).item()
    assert 0 < error <= MARGIN * noise_model_error(reference, inputs)
    assert type(model.get_submodule(EXPECTED_FP8[0]).weight) is nn.Parameter  # no FSDP wrapper for sampling


# ---------------------------------------------------------------------------------------------- FSDP2

FSDP_SCRIPT = textwrap.dedent(
    """
    import functools, math, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def worker(rank, port, out_dir):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        from torch.distributed.fsdp import fully_shard
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
        from selfe.components.fp8 import FP8Config, convert_for_training, post_optimizer_step
        sys.path.insert(0, os.path.dirname(__file__))
        from common import make_model, make_inputs, run_steps
        gathered = []  # dtypes FSDP2 all-gathers for the converted weights
        original = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather
        @functools.wraps(original)  # FSDP2 checks the hook's signature
        def spy(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            gathered.extend(str(t.dtype) for t in out[0])
            return out
        WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = spy
        config = FP8Config(recipe="torchao")
        model = convert_for_training(make_model(), config)
        for block in [*model.double_blocks, *model.single_blocks]:
            fully_shard(block)
        fully_shard(model)
        losses = run_steps(model, lambda: post_optimizer_step(model, config))
        torch.save({"losses": losses, "gathered": sorted(set(gathered))}, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()
        os._exit(0)  # as selfe.train.cli does: gloo's threads may abort the process if Python finalises first

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)

COMMON_SCRIPT = textwrap.dedent(
    """
    import math, torch
    from selfe.network.config import mmdit_preset
    from selfe.network.model import MMDiT

    def make_model():
        torch.manual_seed(0)
        model = MMDiT(mmdit_preset("tiny"))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=gen)
                if param.dim() >= 2:
                    param.copy_(noise / math.sqrt(param.shape[1]))
                else:
                    param.copy_(0.1 * noise + (1.0 if name.endswith(("query_weight", "key_weight")) else 0.0))
        return model

    def make_inputs():
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, 8, 8, generator=gen)
        t = torch.rand(2, generator=gen) * 0.8 + 0.1
        cond = {"txt": torch.randn(2, 8, 32, generator=gen), "pooled": torch.randn(2, 16, generator=gen)}
        return x, t, 0.5 * t, cond, torch.randn(x.shape, generator=gen)

    def run_steps(model, after_step, steps=4):
        # SGD, not Adam: its update is linear in the gradient, so sharded and unsharded runs stay close
        # (Adam's first steps move every weight by about +-lr, amplifying any last-bit difference).
        x, t, s, cond, target = make_inputs()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x, t, s, cond), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            after_step()
            losses.append(loss.item())
        return losses
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@needs_torchao
@pytest.mark.dist
def test_fsdp2_two_gloo_ranks_train_with_fp8_all_gather(tmp_path):
    """fully_shard on the blocks and the root, tensorwise FP8 all-gather: runs on CPU gloo too.

    Both ranks see the same batch, so the averaged gradient is one rank's and the sharded run must follow
    the single-process FP8 run step for step (the tensorwise weight scale is a global amax either way).
    SGD keeps small differences small (see run_steps).
    """
    (tmp_path / "common.py").write_text(COMMON_SCRIPT)
    (tmp_path / "fsdp.py").write_text(FSDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "fsdp.py"), str(free_port()), str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["gathered"] == ["torch.float8_e4m3fn"]  # the converted weights travel in FP8

    sys.path.insert(0, str(tmp_path))
    try:
        import common
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("common", None)
    single = common.run_steps(convert_for_training(common.make_model(), torchao_config()), lambda: None)
    losses = ranks[0]["losses"]
    assert losses[-1] < 0.9 * losses[0], losses
    fp32 = common.run_steps(common.make_model(), lambda: None)
    losses, single, fp32 = torch.tensor(losses), torch.tensor(single), torch.tensor(fp32)
    assert losses[0] == single[0]  # the first forward is bit-identical: same weights, same global amax
    # Later steps: FSDP precomputes the weight scale in float64 (torchao's precompute), eager in float32; a
    # last-bit difference flips a few e4m3 roundings, so the runs drift apart by ~1e-4, far less than FP8
    # moves them from fp32 training.
    torch.testing.assert_close(losses, single, rtol=2e-4, atol=0)
    assert (losses - single).abs().max() < 0.25 * (single - fp32).abs().max()


# ---------------------------------------------------------------------------------------------- TE


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is importable here")
def test_te_without_transformer_engine_raises_naming_the_reason():
    reason = optional.import_error("transformer_engine")
    for call in (
        lambda: convert_for_training(make_model(), FP8Config(recipe="te")),
        lambda: convert_for_inference(make_model(), FP8Config(recipe="te")),
        lambda: fp8_autocast_context(FP8Config(recipe="te")),
    ):
        with pytest.raises(RuntimeError, match="transformer_engine") as info:
            call()
        assert reason in str(info.value)


@needs_te
def test_te_linears_within_bound_and_checkpoint_keys_kept():
    reference, inputs = make_model().cuda(), [v.cuda() if torch.is_tensor(v) else v for v in make_inputs()]
    inputs[3] = {k: (v.cuda() if v is not None else None) for k, v in inputs[3].items()}
    model = convert_for_training(copy.deepcopy(reference), FP8Config(recipe="te"))
    assert sorted(converted_modules(model)) == EXPECTED_FP8
    assert list(high_precision_state_dict(model)) == list(reference.state_dict())
    load_high_precision_state_dict(model, reference.state_dict())  # no _extra_state in the checkpoint
    with torch.no_grad():
        exact = reference(*inputs)
        with fp8_autocast_context(FP8Config(recipe="te")):
            out = model(*inputs)
    error = ((out - exact).norm() / exact.norm()).item()
    assert 0 < error <= MARGIN * noise_model_error(reference, inputs)


# ---------------------------------------------------------------------------------------------- probes


def test_probe_records_the_import_error(monkeypatch):
    monkeypatch.setitem(optional.OPTIONAL_MODULES, "nvtx", "selfe_no_such_module_xyz")
    monkeypatch.setattr(optional, "_results", {})
    assert not optional.nvtx_available()
    assert "selfe_no_such_module_xyz" in optional.import_error("nvtx")
    assert "selfe_no_such_module_xyz" in optional.unavailable_reason("nvtx")
    with pytest.raises(RuntimeError, match="profiling needs nvtx"):
        optional.require("nvtx", "profiling")
    with pytest.raises(ValueError, match="unknown optional library"):
        optional.probe("tensorflow")


def test_importing_fp8_imports_no_optional_library():
    code = (
        "import sys, selfe.components.fp8, selfe.utils.optional; "
        "print([m for m in ('torchao', 'transformer_engine', 'flash_attn', 'nvtx') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- bench


def load_bench_fp8():
    sys.path.insert(0, str(REPO))
    try:
        from bench import fp8 as bench_fp8
    finally:
        sys.path.remove(str(REPO))
    return bench_fp8


def test_relative_error():
    bench = load_bench_fp8()
    b = torch.tensor([3.0, 4.0])
    assert bench.relative_error(b + torch.tensor([0.3, 0.4]), b) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shapes"):
        bench.relative_error(b, b[:1])
    with pytest.raises(ValueError, match="all zeros"):
        bench.relative_error(b, torch.zeros(2))


@needs_torchao
def test_compare_fp8_smoke_on_cpu():
    bench = load_bench_fp8()
    inputs = make_inputs()
    bound = MARGIN * noise_model_error(make_model(), inputs)
    for training in (False, True):
        result = bench.compare_fp8(make_model, inputs, torchao_config(), training=training, warmup=0, iters=1)
        assert result.converted == len(EXPECTED_FP8)
        assert result.baseline_seconds > 0 and result.fp8_seconds > 0 and result.speedup > 0
        assert 0 < result.relative_error <= bound
        assert result.mode in result.summary() and "speedup" in result.as_dict()
