"""The trainer's config: checks that must fail at start-up, not thousands of steps into a run."""

from __future__ import annotations

import pytest

from selfe.train.cli import train_main
from selfe.train.config import apply_overrides, check_fake_prompt_encoder, config_from_dict, preset
from selfe.train.lr import lr_at
from selfe.train.sources import build_source


def test_an_aux_term_switching_on_in_a_cache_run_needs_its_text_encoders_at_start(tmp_path, capsys) -> None:
    """The 2b preset's aux term starts at 550k and encodes its fake prompt with T5 + CLIP: without them the
    run must not start (it used to fail 550k iterations in)."""
    check = lambda *overrides: check_fake_prompt_encoder(apply_overrides(preset("2b"), list(overrides)))
    with pytest.raises(ValueError, match=r"objective\.aux_start=550000 .*needs data\.t5_path and data\.clip_path"):
        check()
    with pytest.raises(ValueError, match=r"needs data\.clip_path .*set it, or objective\.aux_start=none"):
        check(f"data.t5_path={tmp_path}")
    t5, clip = tmp_path / "t5", tmp_path / "clip"
    paths = [f"data.t5_path={t5}", f"data.clip_path={clip}"]
    t5.mkdir()
    with pytest.raises(ValueError, match=r"data\.clip_path=.*clip': no such file or folder"):
        check(*paths)
    clip.mkdir()
    check(*paths)
    # The aux term never on within the run (the split run's first leg), off, or smoke encoders: nothing needed.
    for fine in (["steps=500000"], ["objective.aux_start=none"], ["data.encoders=smoke"]):
        check(*fine)
    assert train_main(["2b", "--print-config"]) == 0  # the preset itself stays printable
    capsys.readouterr()
    assert train_main(["2b", f"run_dir={tmp_path / 'run'}"]) == 2  # the trainer checks before building
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "objective.aux_start" in err and "data.t5_path" in err


def test_data_seed_must_suit_numpy_and_torch() -> None:
    for bad in ("-1", str(2**64)):
        with pytest.raises(ValueError, match=r"data\.seed must lie in \[0, 2\*\*64\)"):
            apply_overrides(preset("smoke"), [f"data.seed={bad}"])
    config = apply_overrides(preset("smoke"), [f"data.seed={2**64 - 1}"])
    (batch,) = build_source(config.data, config.model, 0, 1, 1).next_step(want_fake=False)  # the largest runs
    assert batch["x0"].shape[0] == config.data.batch_size


def test_an_empty_run_dir_is_refused() -> None:
    for empty in ("run_dir=", "run_dir= "):
        with pytest.raises(ValueError, match="run_dir must name a folder"):
            apply_overrides(preset("smoke"), [empty])


def test_time_shift_anchors_are_settable_as_colon_pairs() -> None:
    config = apply_overrides(preset("smoke"), ["objective.time_shift.anchors=256:0.4,1024:1.0"])
    assert config.objective.time_shift.anchors == ((256, 0.4), (1024, 1.0))
    assert config_from_dict(config.to_dict()) == config
    for bad in ("256,0.4,1024,1.0", "256:0.4"):
        with pytest.raises(ValueError, match=r"needs 2 comma-separated values, each 2 colon-separated \(x:x,x:x\)"):
            apply_overrides(preset("smoke"), [f"objective.time_shift.anchors={bad}"])
    with pytest.raises(ValueError, match="needs 2 comma-separated values, got"):
        apply_overrides(preset("smoke"), ["optim.betas=0.9:0.95"])


def test_the_2b_split_run_keeps_one_learning_rate_schedule() -> None:
    """steps=500000, then a resume with steps=710000: both legs decay towards 710k."""
    optim = preset("2b").optim
    assert optim.decay_steps == 710_000
    for step in (0, 999, 250_000, 499_999):
        assert lr_at(step, optim, 500_000) == lr_at(step, optim, 710_000)
    assert lr_at(499_999, optim, 500_000) > optim.final_lr  # still decaying at the end of the first leg


def test_the_2b_preset_at_its_high_resolution_names_the_switch_that_fixes_one_resolution() -> None:
    # `2b data.resolution=512` (the MFU benchmark's shape) used to fail with the schedule's own words.
    with pytest.raises(ValueError, match=r"data.high_resolution=512 must be above data.resolution=512.*=none"):
        apply_overrides(preset("2b"), ["data.resolution=512"])
    fixed = apply_overrides(preset("2b"), ["data.resolution=512", "data.high_resolution=none"])
    assert fixed.data.resolution_schedule().resolutions == [512]
