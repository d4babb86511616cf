"""The trainer in one process (world size 1, gloo, FSDP2): config, schedule, FLOP accounting, exact
resume, non-finite steps, export, and the smoke config's loss falling."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfe.components.weights import StateDictMismatchError
from selfe.network.config import mmdit_preset
from selfe.network.flops import mmdit_forward_flops
from selfe.network.model import MMDiT
from selfe.train.config import OptimConfig, apply_overrides, config_from_dict, load_config, preset
from selfe.train.lr import lr_at
from selfe.train.metrics import step_flops
from selfe.train.trainer import NonFiniteLossError, Trainer
from tests.helpers_data import make_procedural_dataset
from tests.train.helpers_trainer import read_metrics, tiny_config


def _run(config, hook=None):
    trainer = Trainer(config)
    try:
        if hook is not None:
            hook(trainer)
        return trainer.train()
    finally:
        trainer.close()


def test_presets_round_trip_and_overrides_are_checked(tmp_path):
    for name in ("smoke", "0.5b", "2b"):
        config = preset(name)
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    config = apply_overrides(preset("smoke"), ["optim.lr=1e-4", "objective.aux_start=none", "optim.betas=0.8,0.9"])
    assert config.optim.lr == 1e-4 and config.objective.aux_start is None and config.optim.betas == (0.8, 0.9)
    for bad, message in [
        ("optim.lrr=1", "no field 'lrr'"),
        ("optim.lr=fast", "cannot parse"),
        ("parallel.compile=maybe", "bool"),
        ("optim=1", "is a section"),
        ("data.source=web", "data.source"),
        ("steps", "key=value"),
        ("optim.lr=nan", "must be finite"),
        ("optim.grad_clip=inf", "must be finite"),
        ("checkpoint.export_guidance=-2", "export_guidance must be a finite number >= 0"),
        ("checkpoint.export_dtype=int8", "export_dtype must be one of bf16, bfloat16, .*float32.*, got 'int8'"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_overrides(preset("smoke"), [bad])


def test_a_saved_config_is_type_checked_and_named_in_errors(tmp_path):
    """A hand-edited config.json fails on load, naming the file and the key, not later in the optimizer."""
    good = preset("smoke").to_dict()
    good["optim"]["lr"] = 1  # a JSON int is a fine float
    path = tmp_path / "config.json"
    path.write_text(json.dumps(good))
    assert load_config(path).optim.lr == 1.0 and isinstance(load_config(path).optim.lr, float)
    for section, key, value, message in [
        ("optim", "lr", "abc", "'optim.lr' must be float"),
        ("optim", "betas", [0.9], "'optim.betas' needs 2 values"),
        ("optim", "grad_clip", "none", "'optim.grad_clip' must be float"),
        (None, "steps", True, "'steps' must be int"),
        ("fault", "inject_nan_steps", [1, "2"], "'fault.inject_nan_steps' must be int"),
    ]:
        bad = json.loads(json.dumps(good))
        (bad[section] if section else bad)[key] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"{path}.*{message}"):
            load_config(path)
    path.write_text("{")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        load_config(path)


def test_lr_warmup_then_linear_decay():
    cfg = OptimConfig(lr=1.0, final_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(100, cfg, 14) == pytest.approx(0.1)


def test_step_flops_count_every_pass():
    model = mmdit_preset("tiny")
    f = lambda n: mmdit_forward_flops(model, n, 64, 8)  # noqa: E731
    off = step_flops(model, 8, 64, 8, 4, aux_on=False)
    assert off["total"] == 3 * f(8) + 2 * f(4)
    on = step_flops(model, 8, 64, 8, 4, aux_on=True)
    assert on["total"] == 3 * f(8) + 2 * f(4) + 3 * f(4)  # the fake pass's forward is also g_f: run once
    assert "useful" not in on  # without the batch's masks


def test_step_flops_count_useful_work_from_the_masks():
    model = mmdit_preset("tiny")
    one = lambda n: mmdit_forward_flops(model, 1, 64, n)  # noqa: E731
    lengths = torch.tensor([3, 8, 5, 2])  # 4 captions padded to 8; the first 2 self-evaluated
    mask = torch.arange(8)[None, :] < lengths[:, None]
    null = torch.arange(8)[None, :] < torch.ones(4, 1, dtype=torch.long)  # EOS alone
    masks = {"cond": mask, "null_cond": null, "fake_cond": mask.roll(1, dims=0)}  # fake lengths 2, 3, 8, 5
    parts = step_flops(model, 4, 64, 8, 2, aux_on=True, text_masks=masks)
    main = 3 * (one(3) + one(8) + one(5) + one(2))
    self_eval = one(3) + one(8) + 2 * one(1)  # the EMA's captioned pass and the live null pass, rows 0-1
    assert int(parts["useful"]) == main + self_eval + 3 * (one(2) + one(3))
    assert parts["total"] == 3 * 4 * one(8) + 2 * 2 * one(8) + 3 * 2 * one(8)  # executed: all at 8
    no_masks = step_flops(model, 4, 64, 8, 2, aux_on=False, text_masks={"cond": None, "null_cond": None})
    assert no_masks["useful"] == no_masks["total"]  # no mask: every token real


@pytest.mark.slow
def test_fused_adamw_follows_foreach(tmp_path):
    """optim.implementation=fused (the default on CUDA) on FSDP2's DTensor parameters: the same training."""
    foreach = _run(tiny_config(tmp_path / "foreach", 4, "optim.implementation=foreach"))
    trainer = Trainer(tiny_config(tmp_path / "fused", 4, "optim.implementation=fused"))
    try:
        assert all(group["fused"] for group in trainer.optimizer.param_groups)
        fused = trainer.train()
    finally:
        trainer.close()
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(foreach.losses), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="optim.implementation"):
        tiny_config(tmp_path, 1, "optim.implementation=apex")


def test_a_resume_takes_the_optimizer_implementation_and_settings_from_the_config(tmp_path):
    """A run saved with foreach resumes fused (as a CPU run moved to a GPU would), and a changed weight decay
    applies; the learning rate stays the schedule's."""
    _run(tiny_config(tmp_path, 2, "optim.implementation=foreach"))
    trainer = Trainer(tiny_config(tmp_path, 4, "optim.implementation=fused", "optim.weight_decay=0.25"))
    try:
        assert trainer.step == 2
        for group in trainer.optimizer.param_groups:
            assert group["fused"] and not group["foreach"] and group["weight_decay"] == 0.25
            assert group["lr"] == pytest.approx(lr_at(2, trainer.config.optim, 4))
        steps = [s["step"] for s in trainer.optimizer.state.values()]
        assert steps and all(s.dtype == torch.float32 and s.item() == 2 for s in steps)  # fused keeps fp32 steps
        assert len(trainer.train().losses) == 2
    finally:
        trainer.close()


def test_a_resume_takes_the_learning_rate_schedule_from_the_config(tmp_path, caplog):
    """A changed peak lr (or decay) applies from the next step, as in an uninterrupted run with the new
    config; the saved peak is not mixed in, and the jump is logged."""
    _run(tiny_config(tmp_path, 2, "optim.lr=2e-3", "optim.final_lr=1e-4"))
    with caplog.at_level("WARNING", logger="selfe.train.lr"):
        trainer = Trainer(tiny_config(tmp_path, 4, "optim.lr=1e-3", "optim.final_lr=1e-3"))
    try:
        new = trainer.config.optim
        for group in trainer.optimizer.param_groups:
            assert group["lr"] == pytest.approx(lr_at(2, new, 4), rel=1e-12) and group["initial_lr"] == 1e-3
        assert "the learning rate resumes at 0.001 where the checkpoint's schedule had 0.002" in caplog.text
        records = trainer.train().losses and read_metrics(tmp_path)
    finally:
        trainer.close()
    assert [r["lr"] for r in records[2:]] == pytest.approx([1e-3, 1e-3])


def test_a_resume_refuses_another_model_and_a_fresh_run_refuses_a_used_run_dir(tmp_path, capsys):
    """Both would mix two runs; each is one line before any work, and the run's config.json stays the one
    its checkpoints were written with."""
    _run(tiny_config(tmp_path, 2))
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"model.hidden_size: 64 in the checkpoint, 96 now.*another run_dir"):
        Trainer(tiny_config(tmp_path, 4, "model.hidden_size=96", "model.axes_dim=4,10,10"))
    with pytest.raises(ValueError, match=r"holds an earlier run's checkpoints \(the latest step_000000002\)"):
        Trainer(tiny_config(tmp_path, 4, "checkpoint.resume=false"))
    assert (tmp_path / "config.json").read_text() == saved
    # The implementation of a layer is free to change: a resume on another attention backend runs on.
    trainer = Trainer(tiny_config(tmp_path, 3, "model.attention_backend=math"))
    try:
        assert trainer.step == 2
    finally:
        trainer.close()


def test_a_resume_drops_the_metrics_of_steps_it_runs_again(tmp_path):
    """Killed after step 3 with the last checkpoint at 2 (and half a line written): the rerun logs 3 and 4
    once, and every line of metrics.jsonl is strict JSON."""
    _run(tiny_config(tmp_path, 4, "checkpoint.every=2", "checkpoint.keep=3"))
    for name in ("step_000000004",):
        shutil.rmtree(tmp_path / "checkpoints" / name)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": 4, "lo')
    _run(tiny_config(tmp_path, 4, "checkpoint.every=2", "checkpoint.keep=3"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_resume_equals_uninterrupted_run(tmp_path):
    n = 4
    full = _run(tiny_config(tmp_path / "full", 2 * n))
    first = _run(tiny_config(tmp_path / "split", n))
    assert (tmp_path / "split" / "checkpoints" / f"step_{n:09d}").is_dir()
    second = _run(tiny_config(tmp_path / "split", 2 * n))
    assert second.step == 2 * n and len(second.losses) == n  # it resumed, it did not start over
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=0, atol=1e-6)
    a = load_file(tmp_path / "full" / "export" / "model.safetensors")
    b = load_file(tmp_path / "split" / "export" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    saved = load_config(tmp_path / "split" / "checkpoints" / f"step_{2 * n:09d}" / "config.json")
    assert saved == tiny_config(tmp_path / "split", 2 * n)


def test_nan_batch_is_skipped_and_counted(tmp_path):
    # an explicit peak overrides the device's (a CPU would get the H100's): MFU = TFLOP/s per device / 1
    config = tiny_config(tmp_path / "nan", 4, "fault.inject_nan_steps=2", "metrics.peak_flops=1e12")
    snapshots = {}

    def hook(trainer):
        original = trainer.train_step

        def step():
            if trainer.step in (2, 3):
                snapshots[trainer.step] = [p.detach().full_tensor().clone() for p in trainer.model.parameters()]
            return original()

        trainer.train_step = step

    def check_sharding(trainer):
        hook(trainer)
        from torch.distributed.tensor import DTensor

        # the EMA copy is sharded like the live model: DTensor shards on the same mesh and placements
        for live, ema in zip(trainer.model.parameters(), trainer.ema.model.parameters(), strict=True):
            assert isinstance(live, DTensor) and isinstance(ema, DTensor)
            assert live.placements == ema.placements and live.device_mesh == ema.device_mesh
            assert not ema.requires_grad

    result = _run(config, check_sharding)
    records = read_metrics(tmp_path / "nan")
    for key in (
        "loss", "loss_data", "loss_self", "loss_fake", "lambda_mean", "grad_norm", "lr", "step_time",
        "images_per_s", "tokens_per_s", "tflops_per_device", "mfu", "skipped_total", "executed_tflops_per_step",
    ):  # fmt: skip
        assert all(key in r for r in records), key
    assert records[-1]["mfu"] == pytest.approx(records[-1]["tflops_per_device"]) and records[-1]["mfu"] > 0
    assert records[-1]["lambda_mean"] > 0
    assert result.skipped == 1 and [r["skipped"] for r in records] == [False, False, True, False]
    assert records[2]["loss"] is None  # NaN is not JSON: the skipped step's loss is null
    for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert records[-1]["skipped_total"] == 1
    for before, after in zip(snapshots[2], snapshots[3]):  # the poisoned step changed no weight
        assert torch.equal(before, after)
    assert all(torch.isfinite(p).all() for p in snapshots[3])


def test_nonfinite_streak_aborts_with_a_clear_message(tmp_path):
    config = tiny_config(tmp_path / "streak", 6, "fault.inject_nan_steps=1,2,3", "fault.max_nonfinite_streak=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        _run(config)


def test_export_loads_into_the_model_and_pipeline_config(tmp_path):
    from selfe.sampling.pipeline import read_pipeline_config

    config = tiny_config(tmp_path / "exp", 2)
    _run(config)
    out = tmp_path / "exp" / "export"
    assert read_pipeline_config(out)["model"] == config.model
    model = MMDiT(config.model)
    model.load_state_dict(load_file(out / "model.safetensors"), strict=True)


def test_selfe_export_writes_a_checkpoints_ema_like_the_runs_own_export(tmp_path):
    from selfe.cli import main

    _run(tiny_config(tmp_path / "run", 4, "checkpoint.every=2", "checkpoint.keep=3"))
    _run(tiny_config(tmp_path / "short", 2))  # decay_steps is fixed, so its 2 steps are the run's first 2
    cases = {  # what `selfe export` is given -> the export it must equal
        tmp_path / "run": tmp_path / "run" / "export",  # a run folder: its newest checkpoint (step 4)
        tmp_path / "run" / "checkpoints" / f"step_{2:09d}": tmp_path / "short" / "export",
    }
    for i, (source, expected) in enumerate(cases.items()):
        out = tmp_path / f"exported{i}"
        assert main(["export", str(source), "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text()) == json.loads((expected / "config.json").read_text())
        got, want = load_file(out / "model.safetensors"), load_file(expected / "model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "short" / "export"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2


def _full_weights(net) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in net.state_dict().items()}


def test_init_from_an_export_starts_live_and_ema_there_and_a_resume_wins(tmp_path):
    _run(tiny_config(tmp_path / "base", 3))
    export = tmp_path / "base" / "export"
    exported = load_file(export / "model.safetensors")
    seen = {}

    def capture(trainer):
        seen["live"], seen["ema"] = _full_weights(trainer.model), _full_weights(trainer.ema.model)

    config = tiny_config(tmp_path / "tune", 2, f"checkpoint.init_from={export}")
    _run(config, capture)
    for net in ("live", "ema"):
        assert seen[net].keys() == exported.keys()
        for key in exported:
            torch.testing.assert_close(seen[net][key], exported[key], rtol=0, atol=0)
    # The run's own checkpoint (step 2) wins over init_from when it is restarted with more steps.
    restarted = Trainer(tiny_config(tmp_path / "tune", 4, f"checkpoint.init_from={export}"))
    try:
        assert restarted.step == 2
        tuned = load_file(tmp_path / "tune" / "export" / "model.safetensors")
        for key, value in _full_weights(restarted.ema.model).items():
            torch.testing.assert_close(value, tuned[key], rtol=0, atol=0)
        assert any(not torch.equal(tuned[k], exported[k]) for k in exported)  # it trained: the weights moved
    finally:
        restarted.close()


def test_init_from_refuses_another_model_or_a_missing_file(tmp_path):
    _run(tiny_config(tmp_path / "base", 1))
    export = tmp_path / "base" / "export"
    # the same names and shapes, another function: caught from the export's config.json
    with pytest.raises(ValueError, match="another model.*rope_theta"):
        Trainer(tiny_config(tmp_path / "theta", 1, f"checkpoint.init_from={export}", "model.rope_theta=500"))
    with pytest.raises(StateDictMismatchError):  # a bare file is checked name by name
        Trainer(
            tiny_config(
                tmp_path / "deeper", 1, f"checkpoint.init_from={export / 'model.safetensors'}", "model.depth_single=2"
            )
        )
    with pytest.raises(FileNotFoundError, match="init_from.*does not exist"):
        Trainer(tiny_config(tmp_path / "none", 1, f"checkpoint.init_from={tmp_path / 'nothing'}"))


def test_init_grow_trains_a_deeper_model_from_an_export(tmp_path):
    _run(tiny_config(tmp_path / "base", 2))
    export = tmp_path / "base" / "export"
    exported = load_file(export / "model.safetensors")
    base_depth = json.loads((export / "config.json").read_text())["model"]["depth_single"]
    seen = {}

    def capture(trainer):
        seen["ema"] = _full_weights(trainer.ema.model)

    grow = (f"checkpoint.init_from={export}", "checkpoint.init_grow=true", f"model.depth_single={base_depth + 1}")
    _run(tiny_config(tmp_path / "grown", 2, *grow), capture)
    new = set(seen["ema"]) - set(exported)
    assert new and all(name.startswith(f"single_blocks.{base_depth}.") for name in new)
    for key in exported:
        torch.testing.assert_close(seen["ema"][key], exported[key], rtol=0, atol=0)
    grown_export = tmp_path / "grown" / "export"
    assert json.loads((grown_export / "config.json").read_text())["model"]["depth_single"] == base_depth + 1
    assert set(load_file(grown_export / "model.safetensors")) == set(seen["ema"])
    # From an export, its config.json still guards every other field, and growth never drops blocks.
    with pytest.raises(ValueError, match="another model.*rope_theta"):
        Trainer(tiny_config(tmp_path / "theta", 1, *grow, "model.rope_theta=500"))
    shrink = (f"checkpoint.init_from={grown_export}", "checkpoint.init_grow=true")  # the base's depth
    with pytest.raises(ValueError, match="only adds blocks.*depth_single"):
        Trainer(tiny_config(tmp_path / "shrunk", 1, *shrink))


def test_smoke_config_trains_and_its_loss_falls(tmp_path):
    config = apply_overrides(
        preset("smoke"),
        [f"run_dir={tmp_path / 'smoke'}", "steps=60", "checkpoint.every=0", "metrics.tensorboard=false"],
    )
    result = _run(config)
    losses = torch.tensor(result.losses)
    assert torch.isfinite(losses).all() and result.skipped == 0
    assert losses[-15:].mean() < 0.7 * losses[:5].mean(), losses.tolist()


def test_images_encoded_on_the_fly_or_read_from_a_cache(tmp_path):
    """No cache: the manifest's images are decoded and encoded by the random-init smoke encoders. With a
    cache: latents and text states are read from it, and the fake prompt of the auxiliary term (switched
    on at step 1) is encoded online."""
    from selfe.train.cache import build_cache
    from selfe.train.cache_shards import CacheConfig
    from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder

    data = make_procedural_dataset(tmp_path / "data", 24, sizes=((64, 64), (96, 64)))
    online = tiny_config(
        tmp_path / "online", 3, "data.source=images", f"data.manifest={data.manifest}", "data.encoders=smoke"
    )
    result = _run(online)
    assert result.step == 3 and result.skipped == 0 and all(math.isfinite(x) for x in result.losses)

    model = online.model
    build_cache(
        data.manifest,
        tmp_path / "cache",
        SmokeImageEncoder(model.in_channels),
        SmokeTextEncoder(model.txt_dim, model.vec_dim, online.data.text_length),
        CacheConfig(resolutions=(64,), shard_size=8, num_threads=0),
        progress=False,
    )
    cached = tiny_config(
        tmp_path / "cached", 3, "data.source=cache", f"data.cache_dir={tmp_path / 'cache'}",
        "data.resolution=64", "data.encoders=smoke", "objective.aux_start=1",
    )  # fmt: skip
    result = _run(cached)
    records = read_metrics(tmp_path / "cached")
    assert [r["aux_on"] for r in records] == [False, True, True]
    assert all(math.isfinite(r["loss_fake"]) for r in records) and records[-1]["loss_fake"] > 0
    assert records[-1]["tflops_per_step"] > records[0]["tflops_per_step"]  # the fake passes are counted
    with pytest.raises(ValueError, match="data.manifest"):
        apply_overrides(preset("smoke"), ["data.source=images"])


def test_progressive_schedule_switches_the_cached_resolution(tmp_path):
    """The paper's schedule through the cache: low resolution first, then (here with probability 1) high."""
    from selfe.train.cache import build_cache
    from selfe.train.cache_shards import CacheConfig
    from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder

    data = make_procedural_dataset(tmp_path / "data", 16, sizes=((64, 64),))
    base = tiny_config(tmp_path / "unused", 1)
    build_cache(
        data.manifest,
        tmp_path / "cache",
        SmokeImageEncoder(base.model.in_channels),
        SmokeTextEncoder(base.model.txt_dim, base.model.vec_dim, base.data.text_length),
        CacheConfig(resolutions=(32, 64), shard_size=8, num_threads=0),
        progress=False,
    )
    config = tiny_config(
        tmp_path / "run", 4, "data.source=cache", f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32",
        "data.high_resolution=64", "data.high_from=2", "data.high_fraction=1.0",
    )  # fmt: skip
    _run(config)
    flops = [r["executed_tflops_per_step"] for r in read_metrics(tmp_path / "run")]  # useful: caption lengths too
    assert flops[0] == flops[1] < flops[2] == flops[3]  # 4x the image tokens from step 2 on

    # The paper's batch change between stages: resume with half the batch. The data order starts a new
    # stage and keeps counting iterations, so the schedule stays at the high resolution.
    _run(apply_overrides(config, ["steps=6", "data.batch_size=2"]))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    executed = [records[k]["executed_tflops_per_step"] for k in (4, 5)]
    assert executed[0] == executed[1] == pytest.approx(flops[3] / 2)
    mix = preset("2b").data.resolution_schedule()
    assert mix.mix_at(499_999) == {256: 1.0} and mix.mix_at(500_000) == {256: 0.5, 512: 0.5}


def test_cli_rejects_a_bad_config(capsys):
    from selfe.train.cli import train_main

    assert train_main(["smoke", "optim.lr=fast"]) == 2
    assert "cannot parse" in capsys.readouterr().err
    assert train_main(["smoke", "--print-config", "steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 7
    assert train_main([str(Path("no") / "such.json"), "--print-config"]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_cli_refuses_a_run_dir_under_a_file_in_one_line(tmp_path, capsys):
    from selfe.train.cli import train_main

    (tmp_path / "a_file").write_text("")
    assert train_main(["smoke", f"run_dir={tmp_path / 'a_file' / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "a_file is a file, not a folder" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_says_in_one_line_that_there_is_no_cuda(tmp_path, capsys):
    from selfe.train.cli import train_main

    assert train_main(["smoke", "device=cuda", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path):
    # aot_eager: the same dynamo trace, guards and autograd graph as inductor, without its C++ build on CPU.
    plain = _run(tiny_config(tmp_path / "plain", 3))
    compiled = _run(
        tiny_config(tmp_path / "compiled", 3, "parallel.compile=true", "parallel.compile_backend=aot_eager")
    )
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(plain.losses), rtol=0, atol=1e-5)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    plain = _run(tiny_config(tmp_path / "plain", 3))
    ac = _run(tiny_config(tmp_path / "ac", 3, "parallel.activation_checkpointing=true"))
    torch.testing.assert_close(torch.tensor(ac.losses), torch.tensor(plain.losses), rtol=0, atol=1e-6)
    a = load_file(tmp_path / "plain" / "export" / "model.safetensors")
    b = load_file(tmp_path / "ac" / "export" / "model.safetensors")
    assert a.keys() == b.keys()  # the wrapper leaves the state-dict names alone
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_the_text_bucket_changes_the_cost_not_the_training(tmp_path):
    # The smoke captions ("a red circle", fake ones with the prefix) fit in 8 of data.text_length=16 tokens.
    extra = ("data.text_length=16", "objective.aux_start=1")
    plain = _run(tiny_config(tmp_path / "plain", 3, *extra))
    cut = _run(tiny_config(tmp_path / "cut", 3, *extra, "data.text_bucket=2"))
    torch.testing.assert_close(torch.tensor(cut.losses), torch.tensor(plain.losses), rtol=0, atol=1e-5)
    flops = lambda run, key: [m[key] for m in read_metrics(tmp_path / run)]  # noqa: E731
    executed = zip(flops("cut", "executed_tflops_per_step"), flops("plain", "executed_tflops_per_step"), strict=True)
    assert all(c < p for c, p in executed)  # fewer text tokens run
    # the same captions: the same useful work, which MFU is taken on
    assert flops("cut", "tflops_per_step") == pytest.approx(flops("plain", "tflops_per_step"), rel=1e-12)
    with pytest.raises(ValueError, match="data.text_bucket must be >= 1"):
        tiny_config(tmp_path / "bad", 1, "data.text_bucket=0")
