"""ShapesEval end to end on CPU: data (manifest, images, text encoders, cache) -> `selfe train` ->
export -> SelfEPipeline -> `selfe eval shapes` (scorer) and `selfe generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfe.components.pixel_autoencoder import SpaceToDepthAutoEncoder, SpaceToDepthConfig
from selfe.shapes.data import MANIFEST, prepare, sample
from selfe.shapes.scene import CATEGORIES
from selfe.train.config import SHAPES_PIXEL_FACTOR, preset
from tests.shapes.helpers_shapes import train_shapes

NUM = 96


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("shapes") / "data", NUM, seed=3, progress=False)


def test_data_set_is_a_manifest_of_its_seeded_samples_and_the_cache_inverts_exactly(shapes_data):
    rows = (shapes_data / MANIFEST).read_text().splitlines()
    assert len(rows) == NUM
    for i in (0, 17, NUM - 1):
        path, caption = rows[i].split("\t")
        expected_caption, expected_image = sample(3, i)
        assert caption == expected_caption
        assert np.array_equal(np.asarray(Image.open(shapes_data / path).convert("RGB")), expected_image)
    assert sample(3, 5)[0] == sample(3, 5)[0] and not np.array_equal(sample(3, 5)[1], sample(4, 5)[1])

    index = json.loads((shapes_data / "cache" / "index.json").read_text())
    assert index["complete"] and sum(s["num"] for s in index["shards"]) == NUM
    shard = load_file(shapes_data / "cache" / index["shards"][0]["file"])
    latents = shard["latents"].float()
    assert latents.shape[1:] == (48, 8, 8)
    autoencoder = SpaceToDepthAutoEncoder(SpaceToDepthConfig(downsample_factor=SHAPES_PIXEL_FACTOR))
    pixels = autoencoder.decode(latents)  # back to [-1, 1]
    first = int(shard["indices"][0])
    image = np.asarray(Image.open(shapes_data / rows[first].split("\t")[0]).convert("RGB"))
    restored = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(restored, image)  # fp16 storage keeps every 8-bit level


def test_presets_train_the_same_budget_with_and_without_self_evaluation():
    self_e, fm = preset("shapes-selfe"), preset("shapes-fm")
    assert self_e.objective.self_eval and not fm.objective.self_eval
    for section in ("model", "data", "optim", "ema", "steps", "seed"):
        assert getattr(self_e, section) == getattr(fm, section), section
    assert self_e.model.in_channels == 48 and self_e.model.patch_size == 1 and self_e.data.encoders == "pixels"


@pytest.mark.slow
def test_train_export_pipeline_eval_and_generate(shapes_data, tmp_path, capsys):
    export = train_shapes("shapes-selfe", shapes_data, tmp_path / "run", 4, f"data.cache_dir={shapes_data / 'cache'}")
    config = json.loads((export / "config.json").read_text())
    assert config["autoencoder"]["type"] == "space_to_depth" and config["resolution"] == 32
    assert (export / "text_encoder" / "config.json").is_file() and (export / "text_encoder_2" / "config.json").is_file()

    from selfe.generate import generate_main
    from selfe.shapes.evaluate import eval_main

    out = tmp_path / "eval"
    argv = ["shapes", "--model", str(export), "--steps", "1", "2", "--images-per-category", "2", "--out", str(out)]
    assert eval_main(argv) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "step/s" not in captured.err  # a line per step count, no bar per pipeline call
    assert "| run | 1 |" in table and "| run | 2 |" in table
    results = json.loads((out / "shapes_eval.json").read_text())["run"]
    for steps in ("1", "2"):
        summary = results["steps"][steps]
        assert summary["counts"] == {c: 2 for c in CATEGORIES}
        scores = [summary["categories"][c] for c in CATEGORIES]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert summary["overall"] == pytest.approx(sum(scores) / len(scores))
    grid = Image.open(out / "shapes_grid_run.png")
    assert grid.size == (2 * 128 + 2, 12 * 128 + 11 * 2)  # 2 step counts x (6 categories x 2 prompts), 4x upscaled

    image_out = tmp_path / "grid.png"
    argv = ["--model", str(export), "--prompt", "a red circle to the left of a blue square", "--steps", "1", "2"]
    assert generate_main([*argv, "--out", str(image_out), "--no-progress"]) == 0
    assert Image.open(image_out).size[1] == 128  # one 32x32 row, upscaled 4x


def test_a_cache_made_with_other_text_encoders_is_refused_not_reused(tmp_path):
    from selfe.shapes.data import ShapesMismatchError

    out = prepare(tmp_path / "data", 8, seed=1, progress=False)
    prepare(out, 8, seed=1, progress=False)  # the same encoders: the cache is complete and kept
    with pytest.raises(ShapesMismatchError, match="another --t5-order-bias"):  # up front, nothing rewritten
        prepare(out, 8, seed=1, progress=False, t5_order_bias=8.0)
