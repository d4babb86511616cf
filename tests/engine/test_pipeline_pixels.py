"""SelfEPipeline and `selfe generate` with a pixel-space model (ShapesEval's kind), offline, on CPU.

The pipeline directory holds a tiny random MMDiT over space-to-depth latents (f = 8, patch 1: 192
channels, one token per 8x8 pixel patch), a config.json naming the weightless "space_to_depth"
autoencoder and the native resolution 32, and tiny T5 / CLIP snapshots; no ae.safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import selfe.shapes
from selfe.components.pixel_autoencoder import SpaceToDepthAutoEncoder, SpaceToDepthConfig
from selfe.generate import NO_MODEL_HELP, auto_upscale, generate_main
from selfe.network.config import mmdit_preset
from selfe.sampling.fast_path import FastPathConfig
from selfe.sampling.pipeline import SelfEPipeline
from selfe.sampling.pipeline_files import read_pipeline_config
from tests.helpers_pipeline import random_mmdit, write_pipeline_dir

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

SIZE = 32  # the model's native resolution: 4 x 4 latents of 192 channels, 16 tokens
FAST = FastPathConfig(compile=True, compile_backend="aot_eager")
PROMPTS = ["a red cat", "a blue dog on the table"]


def write_pixel_pipeline(root: Path, seed: int = 0) -> Path:
    """A pixel-space pipeline directory with random weights and no ae.safetensors."""
    config = mmdit_preset("tiny", in_channels=192, patch_size=1)
    meta = {
        "model": config.to_dict(),
        "sampler": {"steps": 2, "guidance": 5.0, "kernel_backend": "torch"},
        "autoencoder": SpaceToDepthConfig().to_dict(),
        "resolution": SIZE,
        "text": {"t5_max_length": 16},
    }
    return write_pipeline_dir(root, random_mmdit(config, seed), meta)


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pixel_pipeline(tmp_path_factory.mktemp("pixels") / "shapes")


@pytest.fixture(scope="module")
def pipe(pixel_dir: Path) -> SelfEPipeline:
    return SelfEPipeline.from_pretrained(pixel_dir, fast_path=FAST)


def test_loads_without_ae_file_and_defaults_to_native_size(pipe: SelfEPipeline, pixel_dir: Path) -> None:
    assert not (pixel_dir / "ae.safetensors").exists()
    assert isinstance(pipe.autoencoder, SpaceToDepthAutoEncoder)
    assert pipe.default_resolution == SIZE and pipe.default_size == (SIZE, SIZE) and pipe.size_multiple == 8
    out = pipe(PROMPTS, steps=2, seed=0, output_type="pt", fast=False)
    assert out.images.shape == (2, 3, SIZE, SIZE) and out.latents.shape == (2, 192, SIZE // 8, SIZE // 8)
    assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
    assert not torch.allclose(out.images[0], out.images[1])  # the prompt matters
    # The decode is the exact inverse of space-to-depth: pixels = pixel_shuffle(latents / 2), mapped to [0, 1].
    expected = ((torch.nn.functional.pixel_shuffle(out.latents / 2.0, 8) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-6)
    pil = pipe("a cat", steps=1, seed=1, fast=False).images
    assert pil[0].size == (SIZE, SIZE) and pil[0].mode == "RGB"
    other = pipe("a cat", steps=1, seed=1, height=48, width=16, output_type="pt", fast=False).images
    assert other.shape == (1, 3, 48, 16)  # any multiple of 8 works too


def test_fast_path_matches_eager(pipe: SelfEPipeline) -> None:
    torch._dynamo.reset()
    assert pipe.warmup(batch=2) > 0  # height / width omitted: the native 32 x 32
    with torch._dynamo.config.patch(error_on_recompile=True):
        for case in (dict(steps=2, seed=0), dict(steps=3, seed=1, guidance=2.0)):
            fast = pipe(PROMPTS, output_type="pt", fast=True, **case)
            assert "warmup" not in fast.timings
            eager = pipe(PROMPTS, output_type="pt", fast=False, **case)
            torch.testing.assert_close(fast.latents, eager.latents, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast.images, eager.images, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(height=36), "height must be a multiple of 8"),
        (dict(width=4), "width"),
        (dict(height=0), "height"),
        (dict(width=8 * 1000), "width"),
    ],
)
def test_bad_sizes_are_refused(pipe: SelfEPipeline, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pipe("a cat", steps=1, seed=0, fast=False, **kwargs)


def test_config_errors(pixel_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pixel_dir, broken)
    meta = json.loads((pixel_dir / "config.json").read_text())

    def write(**changes) -> None:
        (broken / "config.json").write_text(json.dumps({**meta, **changes}))

    write(autoencoder={"type": "dc_ae", "downsample_factor": 8})
    with pytest.raises(ValueError, match="unknown autoencoder type 'dc_ae'"):
        SelfEPipeline.from_pretrained(broken)
    write(autoencoder={"type": "space_to_depth", "ch": 128})
    with pytest.raises(ValueError, match=r"\['ch'\]"):
        read_pipeline_config(broken)
    write(resolution="32")
    with pytest.raises(ValueError, match="resolution"):
        read_pipeline_config(broken)
    write(resolution=36)  # not a multiple of 8
    with pytest.raises(ValueError, match="config.json: 'resolution' is not a valid default size"):
        SelfEPipeline.from_pretrained(broken)
    write(autoencoder={"type": "space_to_depth", "downsample_factor": 4})  # 48 channels, the model has 192
    with pytest.raises(ValueError, match="in_channels=192"):
        SelfEPipeline.from_pretrained(broken)
    write()
    with pytest.raises(ValueError, match="no weights"):
        SelfEPipeline.from_pretrained(broken, autoencoder_path=broken / "ae.safetensors")
    # "flux1" names the FLUX-architecture autoencoder explicitly: its weights are then required.
    write(autoencoder={"type": "flux1"}, resolution=None)
    parsed = read_pipeline_config(broken)
    assert parsed["autoencoder"] is None and parsed["resolution"] is None
    with pytest.raises(FileNotFoundError, match="autoencoder"):
        SelfEPipeline.from_pretrained(broken)


def test_autoencoder_kind_is_checked(pipe: SelfEPipeline) -> None:
    with pytest.raises(TypeError, match="AutoEncoder or a SpaceToDepthAutoEncoder"):
        SelfEPipeline.from_components(pipe.model, torch.nn.Identity(), pipe.text_encoders)
    same = SelfEPipeline.from_components(pipe.model, SpaceToDepthAutoEncoder(), pipe.text_encoders)
    assert same.default_size == (512, 512)  # no resolution given: today's default
    with pytest.raises(ValueError, match="default_resolution"):
        SelfEPipeline.from_components(pipe.model, pipe.autoencoder, pipe.text_encoders, default_resolution=20)


def test_auto_upscale() -> None:
    assert auto_upscale(32, 32) == 4 and auto_upscale(48, 32) == 4 and auto_upscale(100, 100) == 2
    assert auto_upscale(128, 128) == 1 and auto_upscale(512, 512) == 1


def test_generate_cli_upscales_small_images(pixel_dir: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    out = tmp_path / "grid.png"
    argv = ["--model", str(pixel_dir), "--prompt", *PROMPTS, "--steps", "1", "2", "--out", str(out)]
    assert generate_main([*argv, "--eager", "--no-progress"]) == 0
    assert "steps" not in capsys.readouterr().err  # no progress bar
    grid = Image.open(out)
    assert grid.size == (2 * 4 * SIZE, 2 * 4 * SIZE)  # 32 px -> 4x upscale; columns: steps, rows: prompts
    single = Image.open(tmp_path / "grid_p01_2steps.png")
    assert single.size == (4 * SIZE, 4 * SIZE)
    cell = np.asarray(grid)[4 * SIZE :, 4 * SIZE :]
    np.testing.assert_array_equal(cell, np.asarray(single))
    # Nearest neighbour: each 4x4 block is one pixel of the native image, which the pipeline reproduces.
    native = SelfEPipeline.from_pretrained(pixel_dir, fast_path=FastPathConfig(compile=False))
    generator = torch.Generator().manual_seed(0)
    expected = np.asarray(native(PROMPTS, steps=2, generator=generator, fast=False).images[1])
    np.testing.assert_array_equal(np.asarray(single)[::4, ::4], expected)
    assert np.array_equal(np.asarray(single), expected.repeat(4, axis=0).repeat(4, axis=1))

    assert generate_main([*argv[:-1], str(tmp_path / "one.png"), "--upscale", "1", "--no-progress"]) == 0
    assert Image.open(tmp_path / "one.png").size == (2 * SIZE, 2 * SIZE)
    with pytest.raises(SystemExit):
        generate_main([*argv, "--upscale", "0"])
    assert "--upscale" in capsys.readouterr().err


def test_generate_cli_defaults_to_the_shipped_model(
    pixel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(selfe.shapes, "shipped_model_dir", lambda: None)
    assert generate_main(["--prompt", "a cat"]) == 2
    err = capsys.readouterr().err
    assert NO_MODEL_HELP in err and "shipped" in err

    monkeypatch.setattr(selfe.shapes, "shipped_model_dir", lambda: pixel_dir)
    out = tmp_path / "shipped.png"
    argv = ["--prompt", "a cat", "--steps", "1", "--out", str(out), "--eager", "--no-progress", "--upscale", "1"]
    assert generate_main(argv) == 0
    assert str(pixel_dir) in capsys.readouterr().err  # says which model it uses
    from PIL import Image

    assert Image.open(out).size == (SIZE, SIZE)  # the shipped model's native resolution
