"""The sampling pipeline with `fp8="torchao"` (emulated float8 on CPU): the large linears are converted
after loading, images stay finite and close to the fp32 pipeline's, and `selfe generate --fp8` works."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from selfe.components.fp8 import FP8Config, converted_modules
from selfe.generate import generate_main
from selfe.sampling.pipeline import SelfEPipeline
from tests.engine.test_pipeline import FAST, PROMPTS, SIZE, pipeline_dir, run  # noqa: F401 (pipeline_dir: a fixture)

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

pytest.importorskip("torchao.float8", reason="torchao is the tested FP8 path (pip install torchao)")

# Latent relative error bound. FP8 e4m3 keeps 3 mantissa bits: each quantised operand carries a relative
# rounding error up to 2^-4 (rms about 2^-5), and in a K-long dot product these independent errors partly
# cancel, so one FP8 linear's output is off by a few percent at most (tests/engine/test_fp8.py derives the
# per-linear and whole-network bounds). The sampled latents mix the exact starting noise with the
# denoiser's predictions, so their relative error is smaller still: about 2e-3 observed here. 0.05 is a
# whole e4m3 rounding step short of wrong (a bad scale gives errors of order 1), and `> 0` proves the
# FP8 linears ran at all.
LATENT_REL_BOUND = 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fp8_pipeline_is_close_to_high_precision(pipeline_dir: Path) -> None:  # noqa: F811
    ref = SelfEPipeline.from_pretrained(pipeline_dir)
    fp8 = SelfEPipeline.from_pretrained(pipeline_dir, fp8="torchao")
    assert fp8.fp8 == FP8Config(recipe="torchao") and converted_modules(ref.model) == []
    converted = converted_modules(fp8.model)
    assert converted and all(
        ".img_attn." in n or "_mlp." in n or ".linear" in n or ".txt_attn." in n for n in converted
    )
    assert "final_layer.linear" not in converted and "img_in" not in converted

    want = run(ref, steps=2, seed=0, fast=False)
    got = run(fp8, steps=2, seed=0, fast=False)
    assert torch.isfinite(got.images).all() and torch.isfinite(got.latents).all()
    err = _rel(got.latents, want.latents)
    assert 0 < err < LATENT_REL_BOUND, err  # > 0: the FP8 path really ran
    assert (got.images - want.images).abs().mean() < 0.05  # images in [0, 1]

    # from_components converts too (a copy here: it converts in place), and the compiled step of the fast
    # path traces the converted linears and matches the eager FP8 result.
    comp = SelfEPipeline.from_components(
        copy.deepcopy(ref.model), ref.autoencoder, ref.text_encoders, fp8="torchao", fast_path=FAST
    )
    assert sorted(converted_modules(comp.model)) == sorted(converted)
    torch.testing.assert_close(run(comp, steps=2, seed=0, fast=False).latents, got.latents)
    torch.testing.assert_close(run(comp, steps=2, seed=0, fast=True).latents, got.latents, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="recipe"):
        SelfEPipeline.from_components(ref.model, ref.autoencoder, ref.text_encoders, fp8="fp4")


def test_generate_cli_with_fp8(pipeline_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "grid.png"
    argv = ["--model", str(pipeline_dir), "--prompt", PROMPTS[0], "--steps", "1", "--seed", "0", "--fp8", "torchao"]
    argv += ["--height", str(SIZE), "--width", str(SIZE), "--out", str(out), "--eager", "--no-progress"]
    assert generate_main(argv) == 0 and out.exists()


def test_sample_throughput_bench_reports_fp8_against_high_precision(tmp_path: Path) -> None:
    from tests.engine.test_pipeline_bench import load_bench

    argv = ["--preset", "tiny", "--resolution", "32", "--batch", "1", "--steps", "1", "--variants", "eager"]
    argv += ["--iters", "1", "--txt-tokens", "8", "--fp8", "torchao", "--json", str(tmp_path / "b.json")]
    result = load_bench().main(argv)
    rows = {row["fp8"]: row for row in result["rows"]}
    assert set(rows) == {"none", "torchao"}
    ratio = rows["torchao"]["images_per_s"] / rows["none"]["images_per_s"]
    assert rows["torchao"]["speedup_vs_high_precision"] == pytest.approx(ratio)
    assert result["fp8"]["recipe"] == "torchao" and result["fp8"]["converted_linears"] > 0
    (error,) = result["fp8"]["denoiser_relative_error"]
    assert 0 < error["relative_error"] < LATENT_REL_BOUND  # the denoiser output itself: same e4m3 argument
