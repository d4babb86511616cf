"""The trainer with `fp8.recipe=torchao` (emulated float8 on CPU, one process, FSDP2): the live network's
large linears are Float8Linear, the EMA copy is not, training runs with finite losses, a checkpoint
resumes and the export is an ordinary fp32 state dict that loads strictly into an unconverted MMDiT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from selfe.components.fp8 import FP8Config, converted_modules, fp8_plan, plain_tensor
from selfe.network.config import MMDiTConfig
from selfe.network.model import MMDiT
from selfe.train.config import load_config
from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import REPO, read_metrics, run_train, tiny_config, tiny_overrides

pytest.importorskip("torchao.float8", reason="torchao is the tested FP8 path (pip install torchao)")

FP8 = ("fp8.recipe=torchao",)


def _run(config):
    trainer = Trainer(config)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


@pytest.mark.slow
def test_fp8_training_converts_live_only_resumes_and_exports_high_precision(tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, 3, *FP8, "checkpoint.every=3")
    assert config.fp8 == FP8Config(recipe="torchao")

    trainer, first = _run(config)
    expected = sorted(n for n, d in fp8_plan(MMDiT(config.model), config.fp8).items() if d == "fp8")
    assert expected and sorted(converted_modules(trainer.model)) == expected
    assert converted_modules(trainer.ema.model) == []  # the EMA copy stays high precision
    assert first.step == 3 and first.skipped == 0 and all(math.isfinite(v) for v in first.losses)
    assert load_config(run_dir / "config.json").fp8.recipe == "torchao"  # saved with the resolved config

    # Resume from the step-3 checkpoint written by the FP8 run and go on to step 5.
    trainer, second = _run(tiny_config(run_dir, 5, *FP8, "checkpoint.every=3"))
    assert second.step == 5 and len(second.losses) == 2 and all(math.isfinite(v) for v in second.losses)
    assert sorted(converted_modules(trainer.model)) == expected

    # The export (EMA weights) is plain fp32 and loads strictly into an unconverted model.
    export = run_dir / "export"
    tensors = load_file(str(export / "model.safetensors"))
    assert all(t.dtype == torch.float32 and type(t) is torch.Tensor for t in tensors.values())
    model_config = MMDiTConfig.from_dict(json.loads((export / "config.json").read_text())["model"])
    MMDiT(model_config).load_state_dict(tensors, strict=True)
    # The EMA moved away from the initial weights, i.e. the update worked against the converted network.
    torch.manual_seed(config.seed)
    init = MMDiT(config.model).state_dict()
    key = f"{expected[0]}.weight"
    assert not torch.equal(init[key], tensors[key])


def test_fp8_overrides_are_parsed_and_checked(tmp_path):
    config = tiny_config(tmp_path, 1, "fp8.recipe=torchao", "fp8.scaling=rowwise", "fp8.include=*_mlp.0,*_mlp.2")
    assert config.fp8 == FP8Config(recipe="torchao", scaling="rowwise", include=("*_mlp.0", "*_mlp.2"))
    for bad, message in [("fp8.recipe=fp4", "recipe"), ("fp8.scaling=blockwise", "scaling"), ("fp8.x=1", "no field")]:
        with pytest.raises(ValueError, match=message):
            tiny_config(tmp_path, 1, bad)


@pytest.mark.slow
def test_train_mfu_bench_reports_fp8_against_high_precision(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mfu", REPO / "bench" / "train_mfu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "mfu.json"
    argv = ["--preset", "tiny", "--resolution", "32", "--batch", "2", "--txt-tokens", "8", "--steps", "1"]
    assert bench.main([*argv, "--warmup", "0", "--variants", "eager", "--fp8", "torchao", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {row["fp8"]: row for row in payload["results"]}
    assert set(rows) == {"none", "torchao"} and all(r["loss_finite"] for r in rows.values())
    ratio = rows["none"]["step_time_s"] / rows["torchao"]["step_time_s"]
    assert rows["torchao"]["speedup_vs_high_precision"] == pytest.approx(ratio)
    error = payload["fp8_error"]
    assert error["mode"] == "training" and error["converted"] > 0 and 0 < error["relative_error"] < 0.05


@pytest.mark.slow
def test_fp8_training_on_two_gloo_ranks_with_fp8_all_gather_resumes(tmp_path):
    """FSDP2 over 2 processes: Float8Linear weights all-gathered in FP8 (scales precomputed after each
    optimizer step), the EMA lerp against those wrapped shards, and a DCP checkpoint that resumes."""
    run_dir = tmp_path / "dist"
    first = run_train(tiny_overrides(run_dir, 2, *FP8, "checkpoint.every=2"), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(tiny_overrides(run_dir, 3, *FP8, "checkpoint.every=2"), nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 2" in second.stderr
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    tensors = load_file(str(run_dir / "export" / "model.safetensors"))
    MMDiT(tiny_config(run_dir, 1).model).load_state_dict(tensors, strict=True)


def test_export_of_a_converted_network_is_plain_fp32(tmp_path):
    from selfe.components.fp8 import convert_for_training
    from selfe.train.export import export_ema

    config = tiny_config(tmp_path, 1, *FP8)
    torch.manual_seed(0)
    model = convert_for_training(MMDiT(config.model), FP8Config(recipe="torchao", fsdp_float8_all_gather=True))
    assert converted_modules(model)
    out = export_ema(model, config, tmp_path / "export")
    tensors = load_file(str(out / "model.safetensors"))
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in tensors.values())
    MMDiT(config.model).load_state_dict(tensors, strict=True)
    wrapped = [k for k, v in model.state_dict().items() if type(v) is not torch.Tensor]
    assert wrapped  # the FP8 all-gather wrapper was there to unwrap
    for key, value in model.state_dict().items():
        torch.testing.assert_close(tensors[key], plain_tensor(value).float(), rtol=0, atol=0)
