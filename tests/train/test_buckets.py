"""Aspect-ratio buckets, resize + center crop, and the progressive resolution schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from selfe.train.data import (
    BucketConfig,
    ImageTextLoader,
    LoaderConfig,
    ManifestConfig,
    ResolutionSchedule,
    load_for_bucket,
    read_image_size,
    resize_center_crop,
    scan_manifest,
    to_tensor,
)
from tests.helpers_data import make_procedural_dataset


@pytest.mark.parametrize("base", [256, 512])
def test_buckets_are_multiples_of_16_near_base_area(base):
    config = BucketConfig()
    buckets = config.buckets(base)
    assert len(buckets) == len(config.aspect_ratios)
    for bucket, ratio in zip(buckets, config.aspect_ratios):
        assert bucket.height % 16 == 0 and bucket.width % 16 == 0
        assert abs(bucket.height * bucket.width / base**2 - 1) < 0.1
        assert abs(math.log(bucket.aspect / ratio)) < 0.1
    assert buckets[len(buckets) // 2] == (base, base)
    assert min(b.aspect for b in buckets) == pytest.approx(0.25) and max(b.aspect for b in buckets) == 4.0


def test_bucket_config_validation():
    with pytest.raises(ValueError, match="ascending"):
        BucketConfig(aspect_ratios=(2.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        BucketConfig(aspect_ratios=(0.0, 1.0))
    with pytest.raises(ValueError, match="multiple of 16"):
        BucketConfig().buckets(250)
    assert BucketConfig(aspect_ratios=(1.0,)).buckets(64) == [(64, 64)]


def test_assignment_by_aspect_ratio():
    config = BucketConfig()
    ratios = config.aspect_ratios
    assert ratios[config.aspect_class(1000, 250)] == 4.0
    assert ratios[config.aspect_class(250, 1000)] == 0.25
    assert ratios[config.aspect_class(5000, 100)] == 4.0  # beyond the range: the extreme bucket
    assert ratios[config.aspect_class(300, 200)] == 1.5
    assert ratios[config.aspect_class(640, 480)] == pytest.approx(4 / 3)
    assert ratios[config.aspect_class(510, 500)] == 1.0
    assert ratios[config.aspect_class(0, 0)] == 1.0  # size unknown
    # Nearest in log space: 1.2 is nearer to 4/3 than to 1 (log 1.2 = 0.18 vs log(4/3 / 1.2) = 0.105).
    assert ratios[config.aspect_class(120, 100)] == pytest.approx(4 / 3)


def test_every_batch_from_one_bucket(tmp_path):
    data = make_procedural_dataset(tmp_path, 36, seed=3)
    manifest = scan_manifest(data.manifest, tmp_path, ManifestConfig(min_side=32))
    buckets = BucketConfig()
    loader = ImageTextLoader(
        manifest,
        buckets,
        ResolutionSchedule.fixed(64),
        LoaderConfig(batch_size=2, remainder="pad", num_threads=0),
    )
    shapes = set()
    for batch in loader.iter_epoch(0):
        classes = {buckets.aspect_class(*data.sizes[i]) for i in batch["indices"]}
        assert len(classes) == 1
        (aspect_class,) = classes
        assert tuple(batch["images"].shape[2:]) == buckets.buckets(64)[aspect_class]
        assert batch["captions"] == [data.captions[i] for i in batch["indices"]]
        shapes.add(tuple(batch["images"].shape[2:]))
    assert len(shapes) >= 4  # the data set spans several aspect ratios


def test_resize_center_crop_and_range():
    # 200 x 100 image: left half red, right half blue; crop a 64 x 64 square from the center.
    array = np.zeros((100, 200, 3), np.uint8)
    array[:, :100] = (255, 0, 0)
    array[:, 100:] = (0, 0, 255)
    img = Image.fromarray(array)
    out = resize_center_crop(img, 64, 64)
    assert out.size == (64, 64)
    tensor = to_tensor(out)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    # Scaled to 128 x 64 then cropped to columns 32..96: the colour edge sits in the middle.
    assert torch.allclose(tensor[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None], atol=0.02)
    assert torch.allclose(tensor[:, :, -1], torch.tensor([-1.0, -1.0, 1.0])[:, None], atol=0.02)
    # Portrait to landscape bucket: the shorter side covers, nothing is padded.
    assert resize_center_crop(Image.new("RGB", (90, 300)), 48, 160).size == (160, 48)
    # Exact size: pixels unchanged; white -> +1 and black -> -1.
    same = Image.fromarray(np.array([[[255, 255, 255], [0, 0, 0]]] * 2, np.uint8))
    assert torch.equal(to_tensor(resize_center_crop(same, 2, 2))[0], torch.tensor([[1.0, -1.0], [1.0, -1.0]]))


def test_exif_orientation_swaps_size(tmp_path):
    img = Image.new("RGB", (120, 60), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 60 x 120
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert read_image_size(tmp_path / "rot.jpg") == (60, 120)
    assert load_for_bucket(tmp_path / "rot.jpg", 96, 48).shape == (3, 96, 48)


def test_schedule_deterministic_and_mixing_rate():
    schedule = ResolutionSchedule(stages=[(0, {256: 1.0}), (1000, {256: 0.5, 512: 0.5}), (3000, {256: 1, 512: 3})])
    assert schedule.resolutions == [256, 512]
    assert {schedule.resolution_at(i, seed=0) for i in range(1000)} == {256}
    draws = [schedule.resolution_at(i, seed=0) for i in range(1000, 3000)]
    assert draws == [schedule.resolution_at(i, seed=0) for i in range(1000, 3000)]  # pure function
    assert draws != [schedule.resolution_at(i, seed=1) for i in range(1000, 3000)]  # the seed matters
    # 2000 draws at p = 0.5: standard deviation 0.011, so 0.05 is > 4 sigma.
    assert abs(draws.count(512) / len(draws) - 0.5) < 0.05
    late = [schedule.resolution_at(i, seed=0) for i in range(3000, 5000)]
    assert abs(late.count(512) / len(late) - 0.75) < 0.05
    assert schedule.mix_at(10**9) == {256: 0.25, 512: 0.75}


def test_schedule_validation():
    with pytest.raises(ValueError, match="start at iteration 0"):
        ResolutionSchedule(stages=[(10, {256: 1.0})])
    with pytest.raises(ValueError, match="strictly increasing"):
        ResolutionSchedule(stages=[(0, {256: 1.0}), (0, {512: 1.0})])
    with pytest.raises(ValueError, match="multiple of 16"):
        ResolutionSchedule(stages=[(0, {250: 1.0})])
    with pytest.raises(ValueError, match="sum to 0"):
        ResolutionSchedule(stages=[(0, {256: 0.0})])


def test_loader_draws_resolution_per_batch(tmp_path):
    data = make_procedural_dataset(tmp_path, 18, seed=4, sizes=((96, 96),))
    manifest = scan_manifest(data.manifest, tmp_path, ManifestConfig(min_side=32))
    schedule = ResolutionSchedule(stages=[(0, {32: 1.0}), (4, {32: 0.5, 64: 0.5})])
    config = LoaderConfig(batch_size=3, num_threads=2, batches_per_step=2)
    loader = ImageTextLoader(manifest, BucketConfig(), schedule, config)
    sides = [next(loader)["images"].shape[-1] for _ in range(24)]
    assert sides[:4] == [32] * 4
    assert set(sides[4:]) == {32, 64}
    assert all(sides[i] == sides[i + 1] for i in range(0, 24, 2))  # micro-batches of a step share it
    assert sides[4:] == [schedule.resolution_at(s // 2, 0) for s in range(4, 24)]
    loader.close()


def test_progressive_preset_is_the_papers_schedule():
    paper = ResolutionSchedule.progressive()
    assert paper == ResolutionSchedule(stages=[(0, {256: 1.0}), (500_000, {256: 0.5, 512: 0.5})])
    assert paper.resolution_at(499_999) == 256 and paper.mix_at(500_000) == {256: 0.5, 512: 0.5}
    draws = [paper.resolution_at(i) for i in range(500_000, 502_000)]
    assert abs(draws.count(512) / len(draws) - 0.5) < 0.05
    # Configurable: where it switches and how much of the mix is at the high resolution.
    custom = ResolutionSchedule.progressive(switch_at=10, low=32, high=64, high_fraction=0.25)
    assert custom.mix_at(9) == {32: 1.0} and custom.mix_at(10) == {32: 0.75, 64: 0.25}
    assert ResolutionSchedule.progressive(high_fraction=1.0).mix_at(500_000) == {512: 1.0}
    for bad, match in [
        ({"low": 512}, "below"),
        ({"high_fraction": 0.0}, "high_fraction"),
        ({"switch_at": 0}, "switch_at"),
    ]:
        with pytest.raises(ValueError, match=match):
            ResolutionSchedule.progressive(**bad)
