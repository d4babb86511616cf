"""`selfe eval shapes` with several noise draws per prompt: every draw is sampled with its own seeds, all
of them are scored, and the per-draw scores are reported beside the pooled one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfe.method.schedule import TimeShift
from selfe.sampling.sampler import SamplerConfig
from selfe.shapes import scene
from selfe.shapes.evaluate import EvalConfig, build_parser, evaluate


class CoinPipe:
    """Draws each image from the call's generator: the prompt's true scene with probability 1/2, else blank
    grey, so the score depends on the noise seed the way a sampler's does."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.by_caption = {p.caption: p for p in scene.evaluation_prompts(4)}

    def __call__(self, prompts, steps, generator, output_type, **kwargs):
        self.seeds.append(generator.initial_seed())
        coins = torch.rand(len(prompts), generator=generator).numpy()
        rng = np.random.default_rng(generator.initial_seed())
        images = [
            scene.render(self.by_caption[c], rng) if coin < 0.5 else np.full((32, 32, 3), 128, np.uint8)
            for c, coin in zip(prompts, coins)
        ]
        return SimpleNamespace(images=np.stack(images).astype(np.float64) / 255)


def test_every_draw_is_sampled_with_fresh_seeds_and_scored():
    pipe = CoinPipe()
    config = EvalConfig(steps=(2,), images_per_category=4, samples_per_prompt=3, batch_size=10, seed=7)
    results, images = evaluate(pipe, config)
    batches = 3  # 24 prompts in batches of 10
    assert pipe.seeds == list(range(7, 7 + 3 * batches))  # no two batches of any draw share noise
    summary = results["steps"]["2"]
    assert summary["counts"] == {c: 12 for c in scene.CATEGORIES}
    draws = summary["overall_per_draw"]
    assert len(draws) == 3 and len(set(draws)) > 1  # the draws differ, as the seeds do
    assert summary["overall"] == pytest.approx(sum(draws) / 3)  # equal counts per draw: the pooled mean
    assert 0.2 < summary["overall"] < 0.8
    assert images[2].shape == (24, 32, 32, 3)  # the grid shows the first draw


def test_one_draw_keeps_the_single_draw_summary():
    pipe = CoinPipe()
    results, _ = evaluate(pipe, EvalConfig(steps=(1,), images_per_category=4, batch_size=24, seed=3))
    assert pipe.seeds == [3] and "overall_per_draw" not in results["steps"]["1"]


def test_samples_per_prompt_is_validated():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1"):
        EvalConfig(samples_per_prompt=0)
    assert build_parser().parse_args(["shapes", "--samples-per-prompt", "4"]).samples_per_prompt == 4


def test_a_validation_set_has_its_own_prompts_and_the_sampler_settings_reach_the_pipeline():
    """--prompt-seed picks another prompt list; --eta and --time-shift-mu reach the sampler for the run only."""
    calls = []

    class RecordingPipe:
        device = torch.device("cpu")
        sampler_defaults = SamplerConfig(time_shift=TimeShift(mu=1.0))

        def __call__(self, prompts, steps, generator, output_type, **kwargs):
            calls.append((list(prompts), {**kwargs, "mu": self.sampler_defaults.time_shift.mu}))
            return SimpleNamespace(images=np.zeros((len(prompts), 32, 32, 3)))

    def run(**overrides):
        calls.clear()
        pipe = RecordingPipe()
        evaluate(pipe, EvalConfig(steps=(2,), images_per_category=4, batch_size=24, **overrides))
        assert pipe.sampler_defaults.time_shift.mu == 1.0  # the pipeline's own grid again after the run
        return calls[0]

    held_out, kwargs = run()
    assert kwargs["eta"] is None and kwargs["mu"] == 1.0  # the model's own defaults
    validation, kwargs = run(prompt_seed=1, eta=0.0, time_shift_mu=0.25)
    assert kwargs["eta"] == 0.0 and kwargs["mu"] == 0.25
    assert validation == [p.caption for p in scene.evaluation_prompts(4, 1)] != held_out
    args = build_parser().parse_args(["shapes", "--prompt-seed", "5", "--eta", "0.5", "--time-shift-mu", "0"])
    assert (args.prompt_seed, args.eta, args.time_shift_mu) == (5, 0.5, 0.0)
    assert build_parser().parse_args(["shapes"]).prompt_seed == EvalConfig.prompt_seed
    with pytest.raises(ValueError, match="eta must lie in"):
        EvalConfig(eta=1.5)
    with pytest.raises(ValueError, match="time_shift_mu must be finite"):
        EvalConfig(time_shift_mu=float("nan"))
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        EvalConfig(guidance=-1.0)
    with pytest.raises(ValueError, match="seed and prompt_seed must be >= 0"):
        EvalConfig(seed=-1)


def test_every_model_is_checked_before_the_first_is_evaluated(tmp_path, monkeypatch, capsys):
    """A missing or broken later --model is a one-line error (exit 2) before any model loads or samples."""
    from pathlib import Path

    import selfe.sampling.pipeline
    import selfe.shapes.evaluate as evaluate_module
    from selfe.shapes import shipped_model_dir

    good = shipped_model_dir()
    if good is None:
        pytest.skip("this install lacks the shipped ShapesEval model")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or evaluated before every --model was checked")

    monkeypatch.setattr(selfe.sampling.pipeline.SelfEPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(evaluate_module, "evaluate", refuse)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model": {')
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    out = ["--out", str(tmp_path / "eval"), "--steps", "1"]

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_module.eval_main(["shapes", *argv, *out])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "'/nope'" in refused("--model", str(good), "--model", "/nope")  # the flag repeated
    assert "'/nope'" in refused("--model", str(good), "/nope")  # several after one flag
    assert f"{broken / 'config.json'} is not valid JSON" in refused("--model", str(good), str(broken))
    assert "model weights not found" in refused("--model", str(good), str(no_weights))
    # the flags by their names, not EvalConfig's fields
    assert "error: --images-per-category must be >= 1, got 0" in refused("--images-per-category", "0")
    assert "error: --samples-per-prompt must be >= 1" in refused("--samples-per-prompt", "0")
    assert "error: --seed and --prompt-seed must be >= 0" in refused("--seed", "-1")
    with pytest.raises(SystemExit) as exit_info:  # after `out`: the last --steps is the one taken
        evaluate_module.eval_main(["shapes", "--model", str(good), *out, "--steps", "2", "2"])
    assert exit_info.value.code == 2 and "error: --steps must be distinct" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: this torch has no CUDA device" in refused("--model", str(good), "--device", "cuda")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_module.eval_main(["shapes", "--model", str(good), "--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    args = build_parser().parse_args(["shapes", "--model", "a", "b", "--model", "c"])
    assert args.model == [Path("a"), Path("b"), Path("c")]  # a repeated --model adds, never replaces
    assert build_parser().parse_args(["shapes"]).model is None  # the shipped model
