"""Requests are bounded: images per call, image tokens per image and per call, steps, the upscaled output of
`selfe generate`, and CFG's omega; each is refused before any work, naming the limit, and the limits can be raised
or lifted by someone who means it. Runs on the shipped ShapesEval model (32², 4 pixels a token a side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import selfe.sampling.pipeline
from selfe.generate import MAX_GRID_PIXELS, MAX_OUTPUT_SIDE, generate_main, output_problem
from selfe.sampling.fast_path import FastPathConfig
from selfe.sampling.pipeline import SelfEPipeline
from selfe.sampling.request_limits import RequestLimits
from selfe.shapes import shipped_model_dir

SHIPPED = shipped_model_dir()
pytestmark = [
    pytest.mark.usefixtures("no_network"),  # the whole module offline, no unpickling
    pytest.mark.skipif(SHIPPED is None, reason="this install lacks the shipped ShapesEval model"),
]


@pytest.fixture(scope="module")
def pipe() -> SelfEPipeline:
    return SelfEPipeline.from_pretrained(SHIPPED, fast_path=FastPathConfig(compile=False))


@pytest.fixture
def no_work(pipe: SelfEPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text encoding, noise or a network pass fails the test: the refusal must come before any of them."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the request was checked")

    monkeypatch.setattr(pipe.text_encoders, "encode", fail)
    monkeypatch.setattr(selfe.sampling.pipeline, "draw_noise", fail)
    monkeypatch.setattr(pipe.model, "forward", fail)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(num_images_per_prompt=10**6),
            r"1 prompt x num_images_per_prompt=1000000 means 1000000 images.*256",
        ),
        (dict(prompt=["a red circle"] * 300), r"300 prompts x num_images_per_prompt=1 .*max_images=256"),
        (dict(height=4096, width=4096), r"4096 x 4096 is 1048576 image tokens \(1024 x 1024.*max_image_tokens=16384"),
        (
            dict(height=512, width=512, num_images_per_prompt=64),
            r"64 images of 512 x 512 are 1048576 .*call_tokens",
        ),
        (dict(steps=1001), r"steps=1001 is over RequestLimits.max_steps=1000"),
        (dict(num_inference_steps=10**9), r"max_steps=1000"),
        (dict(guidance=1e308), r"guidance must be a finite number >= 0 and <= 1000, or None \(no CFG\), got 1e\+308"),
        (dict(guidance=1000.5), "guidance must be a finite number >= 0 and <= 1000"),
        (dict(guidance_scale=float("inf")), "guidance must be"),
        (dict(guidance=float("nan")), "guidance must be"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
    ],
)
def test_an_oversized_or_bad_request_is_refused_before_any_work(
    pipe: SelfEPipeline, no_work: None, kwargs: dict, match: str
) -> None:
    kwargs = {"prompt": "a red circle", "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match) as refusal:
        pipe(kwargs.pop("prompt"), **kwargs)
    if "RequestLimits" in str(refusal.value):
        assert "pipe.limits = RequestLimits(...)" in str(refusal.value) and "--no-limits" in str(refusal.value)


def test_warmup_is_bounded_too(pipe: SelfEPipeline, no_work: None) -> None:
    with pytest.raises(ValueError, match=r"batch=1000000 means 1000000 images"):
        pipe.warmup(batch=10**6)
    with pytest.raises(ValueError, match="max_image_tokens"):
        pipe.warmup(batch=1, height=4096, width=4096)


def test_the_defaults_allow_the_legitimate_uses() -> None:
    limits = RequestLimits()
    for images, side, multiple in ((64, 1024, 16), (16, 2048, 16), (96, 32, 4), (1, 512, 4)):  # 2b; ShapesEval
        limits.check_images(images, "test")
        limits.check_tokens(images, side, side, multiple)
    limits.check_steps(1000)


def test_limits_are_raised_or_lifted_on_the_pipeline(pipe: SelfEPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    call = dict(steps=1, guidance=None, seed=0, output_type="latent")
    try:
        pipe.limits = RequestLimits(max_images=1)
        with pytest.raises(ValueError, match="max_images=1"):
            pipe(["a red circle", "a blue square"], **call)
        pipe.limits = RequestLimits.none()
        assert pipe("a red circle", num_images_per_prompt=300, **call).latents.shape[0] == 300
    finally:
        pipe.limits = RequestLimits()
    with pytest.raises(TypeError, match="limits must be a RequestLimits"):
        pipe.limits = None  # type: ignore[assignment]
    assert pipe.limits == RequestLimits()

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights started loading before limits= was checked")

    with monkeypatch.context() as patched:
        patched.setattr(selfe.sampling.pipeline, "load_safetensors_into", no_loading)
        with pytest.raises(TypeError, match="limits must be a RequestLimits"):
            SelfEPipeline.from_pretrained(SHIPPED, limits={"max_steps": 5})
    loaded = SelfEPipeline.from_pretrained(SHIPPED, limits=RequestLimits(max_steps=3))
    assert loaded.limits.max_steps == 3


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "64"])
def test_limits_are_validated(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"RequestLimits.max_images must be an integer >= 1 or None"):
        RequestLimits(max_images=bad)


# ----------------------------------------------------------------------------------------------
# selfe generate


def cli_refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """generate_main exits 2 (returned or raised, as argparse does); its one error line."""
    try:
        code = generate_main(["--no-progress", *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("selfe generate: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("sampling started before the request was checked")

    monkeypatch.setattr(selfe.sampling.pipeline, "draw_noise", fail)  # the first step of sampling, on both paths


def test_generate_refuses_a_huge_upscale_before_sampling(tmp_path: Path, no_sampling: None, capsys) -> None:
    out = ["--prompt", "a red circle", "--out", str(tmp_path / "g.png"), "--eager"]
    line = cli_refusal([*out, "--upscale", "100000"], capsys)
    assert "--upscale 100000 makes the 32x32 images 3200000x3200000, over 8192 pixels a side" in line
    assert "--no-limits" in line
    assert "max_image_tokens" in cli_refusal([*out, "--height", "4096", "--width", "4096"], capsys)
    assert not list(tmp_path.iterdir())


def test_generate_refuses_steps_prompts_guidance_and_seed_before_loading(tmp_path: Path, capsys, monkeypatch) -> None:
    def refuse(cls, *args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(SelfEPipeline, "from_pretrained", classmethod(refuse))
    argv = ["--model", str(tmp_path), "--out", str(tmp_path / "g.png")]
    assert "steps=5000 is over RequestLimits.max_steps=1000" in cli_refusal(
        [*argv, "--prompt", "a", "--steps", "1", "5000"], capsys
    )
    assert "300 --prompt values means 300 images" in cli_refusal([*argv, "--prompt", *["a"] * 300], capsys)
    assert "--guidance must be a finite number >= 0 and <= 1000" in cli_refusal(
        [*argv, "--prompt", "a", "--guidance", "1e308"], capsys
    )
    assert "--seed must be in [0, 2^64 - 1], got -1" in cli_refusal([*argv, "--prompt", "a", "--seed", "-1"], capsys)


def test_no_limits_lifts_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The arguments reach the pipeline, and the pipeline is told: its limits are lifted."""
    from PIL import Image

    class Recorder:
        device = torch.device("cpu")
        default_size = (4, 4)
        limits = RequestLimits()

        def __call__(self, prompts, steps, **kwargs):
            return type("Out", (), {"images": [Image.new("RGB", (4, 4))] * len(prompts), "nonfinite": None})

        def set_progress_bar_config(self, **kwargs):
            pass

    recorder = Recorder()
    monkeypatch.setattr(SelfEPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: recorder))
    argv = ["--model", str(tmp_path), "--prompt", "a", "--steps", "5000", "--out", str(tmp_path / "g.png")]
    assert generate_main([*argv, "--no-progress", "--no-limits"]) == 0
    assert recorder.limits == RequestLimits.none()


def test_output_problem_bounds_each_image_and_the_grid() -> None:
    assert output_problem(2048, 2048, 1, 4, 8) is None  # 2b at 2048², 4 prompts x 8 step counts
    assert output_problem(32, 32, 256, 1, 1) is None  # 8192 a side exactly
    assert "over 8192 pixels a side" in output_problem(32, 32, 257, 1, 1)
    assert f"over {MAX_GRID_PIXELS}" in output_problem(1024, 1024, 1, 64, 8)
    assert MAX_OUTPUT_SIDE == 8192
