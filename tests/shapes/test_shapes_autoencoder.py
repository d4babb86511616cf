"""ShapesEval's tiny trained autoencoder: training, the fitted latent affine, the data command's cache in
its latents, and a run in those latents through `selfe train` -> export -> pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfe.components.autoencoder import config_from_file, load_autoencoder
from selfe.shapes.autoencoder import (
    AutoEncoderTraining,
    load_manifest_images,
    reconstruction_score,
    round_trip,
    to_unit,
    train_autoencoder,
)
from selfe.shapes.data import AE_CACHE, AE_FILE, AE_REPORT, MANIFEST, data_main, prepare
from selfe.shapes.scene import CATEGORIES
from selfe.train.config import SHAPES_AE_CHANNELS, preset
from tests.shapes.helpers_shapes import train_shapes

NUM = 64
QUICK = AutoEncoderTraining(steps=6, batch_size=8, warmup_steps=2, log_every=3)


@pytest.fixture(scope="module")
def ae_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-ae") / "data"
    return prepare(out, NUM, seed=5, progress=False, autoencoder="trained", ae_training=QUICK)


@pytest.mark.slow
def test_training_lowers_the_loss_and_fits_unit_latents(ae_data):
    images, rows = load_manifest_images(ae_data / MANIFEST)
    assert images.shape == (NUM, 3, 32, 32) and images.dtype == torch.uint8
    assert rows["rows_total"] == rows["rows_ok"] == NUM
    config = AutoEncoderTraining(steps=40, batch_size=16, warmup_steps=5, log_every=10)
    ae, log = train_autoencoder(images, config=config, progress=False)
    assert [entry["step"] for entry in log] == [10, 20, 30, 40]
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    with torch.no_grad():
        latents = ae.encode(to_unit(images))
    assert latents.shape == (NUM, SHAPES_AE_CHANNELS, 8, 8)
    assert abs(latents.mean().item()) < 1e-3 and latents.std().item() == pytest.approx(1.0, abs=1e-2)
    decoded = round_trip(ae, images[:3])
    assert decoded.shape == (3, 32, 32, 3) and decoded.dtype == np.uint8


def test_reconstruction_score_is_the_scorer_on_round_trips(ae_data):
    untrained = load_autoencoder(ae_data / AE_FILE)
    score = reconstruction_score(untrained, images_per_category=4)
    assert set(score["categories"]) == set(CATEGORIES)
    assert score["overall"] < 0.5  # six steps of training reconstruct nothing the scorer accepts

    class Identity(torch.nn.Module):  # a lossless round trip scores what the scorer gives the real images: 1.0
        def encode(self, images):
            return images

        def decode(self, latents):
            return latents

    assert reconstruction_score(Identity(), images_per_category=4)["overall"] == 1.0


def test_data_command_writes_the_autoencoder_its_report_and_a_cache_of_its_latents(ae_data):
    report = json.loads((ae_data / AE_REPORT).read_text())
    assert report["rows"]["rows_ok"] == NUM
    assert [entry["step"] for entry in report["losses"]] == [3, 6]
    assert 0.0 <= report["reconstruction"]["overall"] <= 1.0
    config = config_from_file(ae_data / AE_FILE)
    assert config.to_dict() == report["config"] and config.z_channels == SHAPES_AE_CHANNELS
    assert not (ae_data / "cache").exists()  # the pixel cache is the other choice

    index = json.loads((ae_data / AE_CACHE / "index.json").read_text())
    assert index["complete"] and sum(s["num"] for s in index["shards"]) == NUM
    shard = load_file(ae_data / AE_CACHE / index["shards"][0]["file"])
    first = int(shard["indices"][0])
    name = (ae_data / MANIFEST).read_text().splitlines()[first].split("\t")[0]
    image = torch.from_numpy(np.array(Image.open(ae_data / name).convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = load_autoencoder(ae_data / AE_FILE).encode(to_unit(image))
    torch.testing.assert_close(shard["latents"][:1].float(), expected, atol=2e-3, rtol=2e-3)  # fp16 storage


def test_bad_manifest_rows_are_skipped_and_counted_and_larger_images_resized(ae_data, tmp_path):
    rows = (ae_data / MANIFEST).read_text().splitlines()[:3]
    (tmp_path / "corrupt.png").write_bytes((ae_data / rows[0].split("\t")[0]).read_bytes()[:60])
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "large.png")
    lines = [f"{ae_data / r.split(chr(9))[0]}\t{r.split(chr(9))[1]}" for r in rows]
    lines += ["missing.png\ta circle", "corrupt.png\ta square", "large.png\ta red square", "no tab here"]
    (tmp_path / MANIFEST).write_text("\n".join(lines) + "\n")
    images, counts = load_manifest_images(tmp_path / MANIFEST)
    assert images.shape == (4, 3, 32, 32)  # three scenes and the resized large image
    assert (images[3, 0] == 200).all() and (images[3, 1] == 30).all()
    assert counts["rows_ok"] == 4 and counts["missing_file"] == 1 and counts["malformed_line"] == 1
    assert counts["unreadable_image"] + counts["undecodable_image"] == 1


def test_data_command_rejects_a_bad_step_count(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_main(["shapes", "--out", str(tmp_path / "d"), "--num", "4", "--autoencoder", "trained", "--ae-steps", "0"])
    assert "--ae-steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="autoencoder must be one of"):
        prepare(tmp_path / "d", 4, progress=False, autoencoder="vae")


def test_latent_presets_are_the_pixel_presets_in_the_autoencoder_latents():
    for method in ("selfe", "fm"):
        pixels, latents = preset(f"shapes-{method}"), preset(f"shapes-{method}-ae")
        assert latents.model.in_channels == SHAPES_AE_CHANNELS and latents.data.encoders == "flux"
        assert latents.data.ae_path == "data/shapes/ae.safetensors" and latents.checkpoint.export_autoencoder
        for section in ("objective", "optim", "ema", "steps", "seed"):
            assert getattr(latents, section) == getattr(pixels, section), section
    assert preset("shapes-selfe-ae").model == preset("shapes-fm-ae").model
    # each samples at its best setting in the latents (README): Self-E without CFG, flow matching at omega 5
    assert preset("shapes-selfe-ae").checkpoint.export_guidance is None
    assert preset("shapes-fm-ae").checkpoint.export_guidance == preset("shapes-selfe").checkpoint.export_guidance == 5.0


@pytest.mark.slow
def test_a_run_in_the_latents_exports_a_pipeline_that_carries_its_autoencoder(ae_data, tmp_path):
    overrides = [f"data.cache_dir={ae_data / AE_CACHE}", f"data.ae_path={ae_data / AE_FILE}"]
    export = train_shapes("shapes-selfe-ae", ae_data, tmp_path / "run", 3, *overrides)
    assert (export / AE_FILE).read_bytes() == (ae_data / AE_FILE).read_bytes()
    meta = json.loads((export / "config.json").read_text())
    assert meta["autoencoder"] == config_from_file(ae_data / AE_FILE).to_dict()
    assert meta["sampler"]["guidance"] is None  # checkpoint.export_guidance of the Self-E latent preset

    from selfe.sampling.fast_path import FastPathConfig
    from selfe.sampling.pipeline import SelfEPipeline

    pipe = SelfEPipeline.from_pretrained(export, fast_path=FastPathConfig(compile=False))
    assert pipe.sampler_defaults.guidance is None
    out = pipe(["a red circle", "two squares"], steps=2, seed=0, output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and out.latents.shape == (2, SHAPES_AE_CHANNELS, 8, 8)


def test_export_autoencoder_needs_an_autoencoder_file():
    from selfe.train.export import pipeline_config

    config = preset("shapes-selfe")
    config.checkpoint.export_autoencoder = True  # pixels: there is no file to carry
    with pytest.raises(ValueError, match="export_autoencoder needs data.encoders='flux' and data.ae_path"):
        pipeline_config(config)


def test_eval_passes_the_sampler_settings_to_the_pipeline():
    """`selfe eval shapes --s-policy current` samples as flow matching is sampled (s = t); unset: the model's."""
    from types import SimpleNamespace

    from selfe.shapes.evaluate import UNSET, EvalConfig, build_parser, generate_images
    from selfe.shapes.scene import evaluation_prompts

    calls = []

    class RecordingPipe:
        device = torch.device("cpu")

        def __call__(self, prompts, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(images=np.zeros((len(prompts), 32, 32, 3)))

    prompts = evaluation_prompts(1)
    config = EvalConfig(steps=(2,), s_policy="current", sampler="euler", guidance=None)
    assert generate_images(RecordingPipe(), prompts, 2, config).shape == (len(prompts), 32, 32, 3)
    assert calls[0]["s_policy"] == "current" and calls[0]["sampler"] == "euler" and calls[0]["guidance"] is None
    calls.clear()
    generate_images(RecordingPipe(), prompts, 2, EvalConfig(steps=(2,)))
    assert calls[0]["s_policy"] is None and "guidance" not in calls[0]  # the model's own defaults
    assert EvalConfig().guidance is UNSET
    args = build_parser().parse_args(["shapes", "--s-policy", "current"])
    assert args.s_policy == "current"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["shapes", "--s-policy", "fixed"])  # needs a value of s: library API only
