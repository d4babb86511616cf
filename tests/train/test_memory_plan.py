"""Activation checkpointing by plan: the policies, the fake-tensor memory estimate against a measured CPU
step, `auto`'s choice, the old boolean configs, and the per-step communication volume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfe.method.objective import SelfELoss
from selfe.network.model import MMDiT
from selfe.train.config import apply_overrides, config_from_dict, preset
from selfe.train.memory_plan import LiveBytes, activation_peak_bytes, plan_activation_checkpointing
from selfe.train.parallelize import apply_activation_checkpointing, comm_volume, saves_output
from selfe.train.sources import SyntheticSource
from tests.train.helpers_trainer import tiny_config

SYNTHETIC = ("data.source=synthetic", "objective.tau_warmup=0", "checkpoint.export_at_end=false")


def test_old_boolean_configs_map_to_policies() -> None:
    data = preset("smoke").to_dict()
    for old, new in ((True, "full"), (False, "none")):
        data["parallel"]["activation_checkpointing"] = old
        assert config_from_dict(data).parallel.activation_checkpointing == new
    override = apply_overrides(preset("smoke"), ["parallel.activation_checkpointing=true"])
    assert override.parallel.activation_checkpointing == "full"
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        apply_overrides(preset("smoke"), ["parallel.activation_checkpointing=some"])
    assert preset("2b").parallel.activation_checkpointing == "auto"
    assert preset("2b").ema.warmup is False and preset("0.5b").ema.warmup is False  # the paper's constant EMA


def test_selective_policy_saves_gemms_and_attention_only() -> None:
    aten = torch.ops.aten
    assert saves_output(aten.mm.default) and saves_output(aten.addmm.default)
    assert saves_output(aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert not saves_output(aten.gelu.default) and not saves_output(aten.mul.Tensor)
    assert not saves_output(aten.native_layer_norm.default)


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_checkpointing_policies_change_no_gradient(policy) -> None:
    """float64: recomputation gives the very numbers the kept activations would."""
    config = apply_overrides(preset("smoke"), list(SYNTHETIC))
    batch = SyntheticSource(dataclasses.replace(config.data, batch_size=2), config.model, 1).next_step(False)[0]
    double = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    batch = {k: ({n: double(t) for n, t in v.items()} if isinstance(v, dict) else v) for k, v in batch.items()}
    batch["x0"] = batch["x0"].double()
    grads = {}
    for name in ("none", policy):
        torch.manual_seed(0)
        model = MMDiT(config.model).double()
        for p in model.parameters():  # the output layers start at zero: random everywhere
            torch.nn.init.normal_(p, std=0.05)
        ema = MMDiT(config.model).double().requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        apply_activation_checkpointing(model, name)
        loss, _ = SelfELoss(config.objective)(model, ema, batch, 0, torch.Generator().manual_seed(1))
        loss.backward()
        grads[name] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["none"], grads[policy]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_live_bytes_counts_new_storage_not_views() -> None:
    weight = torch.ones(256, 256)
    with LiveBytes() as tracker:
        view = weight.t()  # shares the weight's storage
        fresh = weight * 2  # 256 KiB
        fresh.add_(1)  # in place
        assert tracker.live == fresh.numel() * 4
        del fresh, view
        assert tracker.live == 0 and tracker.peak == 256 * 256 * 4


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_estimate_is_within_15_percent_of_the_measured_cpu_step(tmp_path, policy) -> None:
    """The plan's estimate (parameter count + a fake-tensor trace) against the live tensor bytes of a real
    trainer step on the CPU (FSDP2, world size 1, fp32): the second step, with AdamW's state made."""
    from selfe.train.trainer import Trainer

    config = tiny_config(tmp_path, 3, *SYNTHETIC, f"parallel.activation_checkpointing={policy}", "data.batch_size=8")
    plan = plan_activation_checkpointing(config, None, 1, device_type="cpu")
    trainer = Trainer(config)
    try:
        trainer.train_step()
        with LiveBytes() as tracker:
            tracker.track(p for m in (trainer.model, trainer.ema.model) for p in (*m.parameters(), *m.buffers()))
            tracker.track(v for state in trainer.optimizer.state.values() for v in state.values())
            tracker.reset_peak()
            trainer.train_step()
    finally:
        trainer.close()
    assert plan.policy == policy and len(plan.table) == 1
    ratio = plan.est_peak_bytes / tracker.peak
    print(f"{policy}: estimated {plan.est_peak_bytes / 2**20:.2f} MiB, measured {tracker.peak / 2**20:.2f} MiB")
    assert 0.85 <= ratio <= 1.15, ratio


@pytest.mark.slow
@pytest.mark.dist
def test_estimate_is_within_15_percent_of_each_rank_s_peak_on_two_ranks(tmp_path) -> None:
    """Sharded: two gloo ranks, blocks freed after forward and prefetched, the fp32 state halved."""
    import json
    import subprocess
    import sys

    from tests.train.helpers_trainer import REPO, child_env, free_port

    out = tmp_path / "memory.json"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", "-m", "tests.train.memory_probe", str(out),
        f"run_dir={tmp_path / 'run'}", "steps=3", "data.batch_size=8", "metrics.tensorboard=false", *SYNTHETIC,
    ]  # fmt: skip
    done = subprocess.run(argv, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for peak in result["peaks"]:
        print(f"2 ranks: estimated {result['estimate'] / 2**20:.2f} MiB, measured {peak / 2**20:.2f} MiB")
        assert 0.85 <= result["estimate"] / peak <= 1.15, result


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["none", "full"])
def test_estimate_is_within_15_percent_of_the_cuda_peak(tmp_path, policy) -> None:
    """The same on the GPU: bf16 compute over fp32 shards, against the caching allocator's own peak."""
    from selfe.train.trainer import Trainer

    overrides = (*SYNTHETIC, f"parallel.activation_checkpointing={policy}", "data.batch_size=8", "device=cuda")
    config = tiny_config(tmp_path, 3, *overrides)
    plan = plan_activation_checkpointing(config, None, 1, device_type="cuda")
    trainer = Trainer(config)
    try:
        trainer.train_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step()
        peak = torch.cuda.max_memory_allocated()
    finally:
        trainer.close()
    assert 0.85 <= plan.est_peak_bytes / peak <= 1.15, (plan.est_peak_bytes, peak)


@pytest.mark.slow
def test_auto_takes_the_cheapest_policy_that_fits() -> None:
    config = apply_overrides(preset("smoke"), [*SYNTHETIC, "parallel.activation_checkpointing=auto"])
    free = plan_activation_checkpointing(config, None, 1, device_type="cpu")
    assert [c.policy for c in free.table] == ["none", "selective", "full"] and free.policy == "none"
    peaks = {c.policy: c.est_peak_bytes for c in free.table}
    assert peaks["full"] < peaks["none"] and peaks["selective"] < peaks["none"]
    fraction = config.parallel.memory_fraction
    smallest = min(peaks.values())
    tight = plan_activation_checkpointing(config, int(smallest / fraction) + 1, 1, device_type="cpu")
    assert tight.table[0].fits is False and tight.table[-1].fits is True
    assert tight.policy == next(p for p in ("selective", "full") if peaks[p] == smallest)  # the cheaper of equals
    starved = plan_activation_checkpointing(config, smallest // 2, 1, device_type="cpu")
    assert starved.policy == "full" and not any(c.fits for c in starved.table)  # the smallest peak there is
    roomy = plan_activation_checkpointing(config, int(peaks["none"] / fraction) + 1, 1, device_type="cpu")
    assert roomy.policy == "none"
    # more ranks shard the fp32 state: a smaller peak per rank
    assert plan_activation_checkpointing(config, None, 8, device_type="cpu").table[0].static_bytes < peaks["none"]


def test_activation_trace_grows_with_the_batch() -> None:
    small = apply_overrides(preset("smoke"), [*SYNTHETIC, "data.batch_size=2"])
    large = apply_overrides(preset("smoke"), [*SYNTHETIC, "data.batch_size=8"])
    shards = 4 * sum(p.numel() for p in MMDiT(small.model).parameters())  # the gradients' fp32 shards, traced
    assert activation_peak_bytes(small, "none", 1, "cpu") > shards
    assert activation_peak_bytes(large, "none", 1, "cpu") > activation_peak_bytes(small, "none", 1, "cpu")


@pytest.mark.slow
def test_2b_plan_on_one_and_eight_h100s() -> None:
    """The 2b preset at 512^2 (the schedule's second stage), batch 16 per rank, T5's 512 tokens, the
    auxiliary term on, on 80 GB H100s."""
    config = apply_overrides(preset("2b"), ["data.text_bucket=none"])
    plans = {world: plan_activation_checkpointing(config, 80 * 10**9, world) for world in (1, 8)}
    for plan in plans.values():
        print("\n".join(plan.describe()))
        assert plan.est_peak_bytes <= plan.budget_bytes  # a policy fits
    one, eight = plans[1], plans[8]
    assert one.table[0].static_bytes > 4 * eight.table[0].static_bytes  # the fp32 state is sharded 8 ways
    costs = {"none": 0, "selective": 1, "full": 2}
    assert costs[eight.policy] <= costs[one.policy]  # more ranks free memory for cheaper recomputation
    with torch.device("meta"):
        volume = comm_volume(MMDiT(config.model), config, 8)
    print(volume.describe())
    assert volume.all_gather_bytes > volume.reduce_scatter_bytes > 0


def test_comm_volume_from_parameter_sizes() -> None:
    config = apply_overrides(preset("smoke"), ["parallel.precision=bf16", "objective.aux_start=none"])
    model = MMDiT(config.model)
    n = sum(p.numel() for p in model.parameters())
    assert comm_volume(model, config, 1).total_bytes == 0
    eight = comm_volume(model, config, 8)
    # live: graded forward + self-eval forward + backward re-gather; EMA: one forward; bf16 each
    assert eight.gathers_per_step == 4
    assert eight.all_gather_bytes == round(7 / 8 * 4 * 2 * n)
    assert eight.reduce_scatter_bytes == round(7 / 8 * 4 * n)
    kept = comm_volume(model, apply_overrides(config, ["parallel.reshard_after_forward=false"]), 8)
    assert kept.gathers_per_step == 2  # the live blocks gathered once for the step, the EMA's once
    accum = apply_overrides(config, ["optim.grad_accum=2"])
    assert comm_volume(model, accum, 8).reduce_scatter_bytes == 2 * eight.reduce_scatter_bytes
