"""The latent/text cache: written, killed mid-way, resumed, and read back bit-exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import selfe.cli
from selfe.train.cache import CacheConfig, build_cache
from selfe.train.cache_cli import cache_main
from selfe.train.data import (
    BucketConfig,
    CachedDataset,
    DataConfig,
    ImageTextLoader,
    LoaderConfig,
    ManifestConfig,
    ResolutionSchedule,
    build_loaders,
    load_for_bucket,
    scan_manifest,
)
from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder
from tests.helpers_data import (
    BAD_MAX_CAPTION_CHARS,
    BAD_MIN_SIDE,
    make_bad_manifest,
    make_image,
    make_procedural_dataset,
)
from tests.helpers_text import forbid_network_and_unpickling

CHECKS = ManifestConfig(min_side=32, scan_workers=2)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network_and_unpickling(monkeypatch)


class Recording:
    """Wraps an encoder; keeps every (input, output) pair so the test can compare with the cache."""

    def __init__(self, encoder, fail_after: int | None = None):
        self.encoder = encoder
        self.calls: list[tuple[object, object]] = []
        self.fail_after = fail_after

    def __call__(self, x):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        out = self.encoder(x)
        self.calls.append((x, out))
        return out

    @property
    def items(self) -> int:
        return sum(len(x) for x, _ in self.calls)


def _dataset(tmp_path):
    data = make_procedural_dataset(tmp_path, 22, seed=6, sizes=((96, 96), (128, 64), (64, 128), (96, 72)))
    img, _ = make_image(96, 96, 3)
    img.save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    with open(data.manifest, "a") as f:
        f.write("truncated.png\ta truncated image\n")
    return data


def _config(**overrides):
    return CacheConfig(
        **{
            "resolutions": (32, 48),
            "shard_size": 4,
            "encode_batch_size": 3,
            "num_threads": 2,
            "checks": CHECKS,
        }
        | overrides
    )


def _build(data, out, image_encoder=None, text_encoder=None, **kwargs):
    return build_cache(
        data.manifest,
        out,
        image_encoder or Recording(SmokeImageEncoder()),
        text_encoder or Recording(SmokeTextEncoder()),
        _config(),
        base_dir=data.root,
        progress=False,
        **kwargs,
    )


def test_reader_returns_exactly_what_the_encoders_produced(tmp_path):
    data = _dataset(tmp_path)
    images, texts = Recording(SmokeImageEncoder()), Recording(SmokeTextEncoder())
    index = _build(data, tmp_path / "cache", images, texts)
    assert index["complete"] and index["stats"]["undecodable_image"] == 1 and index["stats"]["rows_ok"] == 22
    manifest = scan_manifest(data.manifest, data.root, CHECKS)
    cache = CachedDataset(tmp_path / "cache", batch_size=2)
    assert len(cache) == 22
    # Text was encoded once per sample (first resolution only) plus "" once (the null condition);
    # images once per sample and resolution.
    assert texts.items == 22 + 1 and images.items == 2 * 22
    assert [prompts for prompts, _ in texts.calls].count([""]) == 1
    null_prompts, null_out = texts.calls[0]
    assert null_prompts == [""]
    null = cache.null_condition(3)
    assert null["txt"].shape == (3, 32, 64) and null["pooled"].shape == (3, 32)
    for key in ("txt", "txt_mask", "pooled"):
        assert torch.equal(null[key], null_out[key].expand_as(null[key])), key
    produced_text = {}
    for prompts, out in texts.calls[1:]:
        for row, prompt in enumerate(prompts):
            produced_text[prompt] = {k: v[row : row + 1] for k, v in out.items()}
    produced_latents = [(x[row], y[row]) for x, y in images.calls for row in range(len(x))]
    for i in cache.sample_indices:
        sample = manifest.samples[i]
        for resolution in (32, 48):
            got = cache.get(i, resolution)
            h, w = got["latents"].shape[-2] * 8, got["latents"].shape[-1] * 8
            image = load_for_bucket(sample.path, h, w)
            (latent,) = [y for x, y in produced_latents if x.shape == image.shape and torch.equal(x, image)]
            assert torch.equal(got["latents"][0], latent)
            assert got["caption"] == sample.caption
            for key in ("txt", "txt_mask", "pooled"):
                assert torch.equal(got[key], produced_text[sample.caption][key]), key
    # The padding the writer trimmed (captions are shorter than 32 tokens) comes back as zeros.
    shard = next(e for e in index["shards"] if e["has_text"])
    assert shard["text_length"] == 32


def test_kill_and_resume_equals_uninterrupted_build(tmp_path):
    data = _dataset(tmp_path)
    reference = _build(data, tmp_path / "reference")
    out = tmp_path / "cache"
    # Run 1 stops after 3 shards (a job split into pieces).
    partial = _build(data, out, max_new_shards=3)
    assert not partial["complete"] and len(partial["shards"]) == 3
    with pytest.raises(ValueError, match="incomplete"):
        CachedDataset(out)
    # Run 2 is killed after 3 encoder calls, inside a shard; a kill during a save leaves a temp file.
    with pytest.raises(KeyboardInterrupt):
        _build(data, out, image_encoder=Recording(SmokeImageEncoder(), fail_after=3))
    done = json.loads((out / "index.json").read_text())["shards"]
    assert 3 < len(done) < reference["total_shards"]
    (out / f"shard-{len(done):06d}.safetensors.tmp").write_bytes(b"half a shard")
    kept = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in done if e["file"]}
    # Run 3 finishes: it redoes only the unfinished shards, and keeps the stored null condition.
    images, texts = Recording(SmokeImageEncoder()), Recording(SmokeTextEncoder())
    final = _build(data, out, image_encoder=images, text_encoder=texts)
    assert [""] not in [prompts for prompts, _ in texts.calls]
    assert final["complete"] and final["total_shards"] == reference["total_shards"]
    assert images.items == 2 * 22 + 1 - sum(len(e["undecodable"]) + e["num"] for e in done)
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    assert not list(out.glob("*.tmp"))
    for a, b in zip(final["shards"], reference["shards"]):
        assert a == b
        if a["file"]:
            assert (out / a["file"]).read_bytes() == (tmp_path / "reference" / b["file"]).read_bytes()
    assert final["stats"] == reference["stats"]
    assert (out / "null.safetensors").read_bytes() == (tmp_path / "reference" / "null.safetensors").read_bytes()
    # A different config in the same folder is refused rather than mixed in.
    with pytest.raises(ValueError, match="another manifest or config"):
        build_cache(data.manifest, out, SmokeImageEncoder(), SmokeTextEncoder(), _config(shard_size=5), progress=False)


def test_a_data_folder_moved_whole_resumes_its_cache(tmp_path):
    data = _dataset(tmp_path / "data")
    partial = _build(data, tmp_path / "data" / "cache", max_new_shards=2)
    assert not partial["complete"]
    kept = {e["file"]: (tmp_path / "data" / "cache" / e["file"]).stat().st_mtime_ns for e in partial["shards"]}
    shutil.move(tmp_path / "data", tmp_path / "moved")  # images, manifest and cache together
    moved = dataclasses.replace(data, root=tmp_path / "moved", manifest=tmp_path / "moved" / data.manifest.name)
    final = _build(moved, tmp_path / "moved" / "cache")
    assert final["complete"] and final["shards"][:2] == partial["shards"]
    assert {f: (tmp_path / "moved" / "cache" / f).stat().st_mtime_ns for f in kept} == kept  # resumed, not redone
    # The cache moved without its images is another data folder as far as it can tell: refused.
    shutil.move(tmp_path / "moved" / "cache", tmp_path / "cache")
    with pytest.raises(ValueError, match="differs in: base_dir"):
        _build(moved, tmp_path / "cache")


def test_a_cache_from_before_the_relative_base_dir_resumes(tmp_path):
    """Older caches recorded the images' folder as an absolute path: the same folder still resumes them."""
    data = _dataset(tmp_path / "data")
    out = tmp_path / "cache"
    partial = _build(data, out, max_new_shards=2)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())
    index["settings"]["base_dir"] = str(data.root.resolve())  # the old form of the record
    index["fingerprint"] = hashlib.sha256(json.dumps(index["settings"], sort_keys=True).encode()).hexdigest()
    index_path.write_text(json.dumps(index))
    kept = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in partial["shards"]}
    final = _build(data, out)
    assert final["complete"] and final["shards"][:2] == partial["shards"]
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept  # resumed, not redone
    assert json.loads(index_path.read_text())["settings"]["base_dir"] == os.path.relpath(data.root.resolve(), out)
    # an absolute record of another folder is still another data folder
    index["settings"]["base_dir"] = str(tmp_path / "elsewhere")
    index["fingerprint"] = hashlib.sha256(json.dumps(index["settings"], sort_keys=True).encode()).hexdigest()
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="differs in: base_dir"):
        _build(data, out)


def test_reader_batches_order_and_resume(tmp_path):
    data = _dataset(tmp_path)
    _build(data, tmp_path / "cache")
    schedule = ResolutionSchedule(stages=[(0, {32: 0.5, 48: 0.5})])
    make = lambda: CachedDataset(tmp_path / "cache", batch_size=2, seed=3, schedule=schedule)
    reference = make()
    expected = [next(reference) for _ in range(12)]
    assert reference.batches_per_epoch < 12
    sizes = set()
    for batch in expected:
        b = len(batch["indices"])
        assert b == 2 and batch["latents"].shape[:2] == (2, 16) and len(batch["captions"]) == 2
        assert batch["txt"].shape == (2, 32, 64) and batch["txt_mask"].dtype == torch.bool
        assert batch["pooled"].shape == (2, 32)
        sizes.add(tuple(batch["latents"].shape[-2:]))
    assert len(sizes) >= 3  # several buckets and both resolutions
    first = make()
    head = [next(first) for _ in range(5)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(7)]
    for a, b in zip(head + tail, expected):
        assert a["indices"] == b["indices"] and all(torch.equal(a[k], b[k]) for k in ("latents", "txt", "pooled"))
    with pytest.raises(ValueError, match="lacks"):
        CachedDataset(tmp_path / "cache", schedule=ResolutionSchedule.fixed(64))


def test_cache_cli_smoke(tmp_path, capsys):
    data = make_procedural_dataset(tmp_path, 8, seed=9, sizes=((96, 96),))
    argv = ["--manifest", str(data.manifest), "--base-dir", str(data.root), "--out", str(tmp_path / "c")]
    argv += ["--resolution", "32", "--shard-size", "3", "--min-side", "32", "--device", "cpu"]
    assert cache_main([*argv, "--smoke", "--no-progress"]) == 0
    assert "3/3 shards" in capsys.readouterr().out
    cache = CachedDataset(tmp_path / "c", batch_size=4)
    assert next(cache)["latents"].shape == (4, 16, 4, 4)
    with pytest.raises(SystemExit):
        cache_main(argv)  # neither --smoke nor the model paths
    with pytest.raises(SystemExit):
        cache_main([*argv, "--smoke", "--ae", "x"])


def test_cache_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.tsv").write_bytes(b"no_tab_line\nmissing.png\ta caption\n")
    argv = ["cache", "--smoke", "--out", str(tmp_path / "c"), "--no-progress"]
    assert selfe.cli.main([*argv, "--manifest", str(tmp_path / "bad.tsv")]) == 2
    assert re.search(
        r"error: manifest .*bad\.tsv has no usable row.*malformed_line=1.*missing_file=1", capsys.readouterr().err
    )
    assert selfe.cli.main([*argv, "--manifest", str(tmp_path / "nowhere.tsv")]) == 2
    assert "nowhere.tsv does not exist" in capsys.readouterr().err
    data = make_procedural_dataset(tmp_path / "d", 3, sizes=((64, 64),))
    argv += ["--manifest", str(data.manifest), "--min-side", "32", "--resolution", "32"]
    assert selfe.cli.main(argv) == 0
    assert selfe.cli.main([*argv[:-1], "48"]) == 2  # another config in the same folder
    assert "another manifest or config" in capsys.readouterr().err


def test_cache_cli_real_path_wiring(tmp_path, monkeypatch, capsys):
    """--ae/--t5/--clip reach the autoencoder and text-encoder loaders (stubbed, stand-in files)."""
    autoencoder = pytest.importorskip("selfe.components.autoencoder")
    text_encoders = pytest.importorskip("selfe.components.text_encoders")
    seen = {}

    class StubAutoEncoder:
        def encode(self, images):
            return SmokeImageEncoder()(images)

    class StubTextEncoders:
        encode = staticmethod(SmokeTextEncoder())

        @classmethod
        def from_snapshots(cls, t5, clip, **kwargs):
            seen["text"] = (t5, clip, kwargs["t5_max_length"], kwargs["dtype"])
            return cls()

    def load_autoencoder(path, device="cpu", dtype=torch.float32):
        seen["ae"] = (path, dtype)
        return StubAutoEncoder()

    monkeypatch.setattr(autoencoder, "load_autoencoder", load_autoencoder)
    monkeypatch.setattr(text_encoders, "TextEncoders", StubTextEncoders)
    data = make_procedural_dataset(tmp_path, 4, seed=2, sizes=((64, 64),))
    ae, t5, clip = _fake_snapshots(tmp_path / "weights")
    argv = ["--manifest", str(data.manifest), "--out", str(tmp_path / "c"), "--resolution", "32"]
    argv += ["--min-side", "32", "--device", "cpu", "--no-progress", "--t5-max-length", "77"]
    assert cache_main([*argv, "--ae", ae, "--t5", t5, "--clip", clip]) == 0
    assert seen == {"ae": (ae, torch.float32), "text": (t5, clip, 77, torch.float32)}
    assert len(CachedDataset(tmp_path / "c", batch_size=4)) == 4

    # The encoders are fingerprinted by content: the same snapshots moved elsewhere resume the cache ...
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "weights", moved)
    (moved / "clip" / ".cache" / "lock").write_bytes(b"other hub metadata")  # hidden files are not weights
    assert cache_main([*argv, "--ae", f"{moved}/ae.sft", "--t5", f"{moved}/t5", "--clip", f"{moved}/clip"]) == 0
    # ... other weights under the same path are refused, naming the mismatch.
    (tmp_path / "weights" / "t5" / "model.safetensors").write_bytes(b"other weights")
    capsys.readouterr()
    assert cache_main([*argv, "--ae", ae, "--t5", t5, "--clip", clip]) == 2
    assert "another manifest or config" in (err := capsys.readouterr().err) and "differs in: encoder_tag" in err


def _fake_snapshots(root):
    """Files laid out like an autoencoder file and two encoder snapshot folders (the loaders are stubbed)."""
    for rel, data in (("ae.sft", b"ae"), ("t5/model.safetensors", b"t5"), ("t5/spiece.model", b"sp"),
                      ("clip/model.safetensors", b"clip"), ("clip/.cache/lock", b"hub metadata")):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root / "ae.sft"), str(root / "t5"), str(root / "clip")


# Scan-time and decode-time counts of tests.helpers_data.make_bad_manifest with 12 good rows.
BAD_COUNTS = {
    "rows_total": 12 + 11,
    "rows_ok": 12,
    "malformed_line": 2,
    "non_utf8_caption": 1,
    "empty_caption": 1,
    "overlong_caption": 1,
    "missing_file": 1,
    "unreadable_image": 2,
    "tiny_image": 1,
    "undecodable_image": 2,
}


def test_selfe_cache_command_reads_back_identically(tmp_path, capsys):
    """`selfe cache --smoke` through the real entry point on a manifest with every kind of bad row:
    the counts, the progress bar, and every cached tensor equal to encoding the loader's image."""
    _, manifest = make_bad_manifest(tmp_path / "data", 12, seed=1)
    out = tmp_path / "cache"
    argv = ["cache", "--smoke", "--manifest", str(manifest), "--out", str(out), "--resolution", "32", "48"]
    argv += ["--shard-size", "4", "--batch-size", "1", "--num-threads", "2", "--device", "cpu"]
    argv += ["--min-side", str(BAD_MIN_SIDE), "--max-caption-chars", str(BAD_MAX_CAPTION_CHARS)]
    assert selfe.cli.main(argv) == 0
    captured = capsys.readouterr()
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["stats"] == BAD_COUNTS
    assert f"{len(index['shards'])}/{index['total_shards']} shards" in captured.out
    # tqdm's bar: count, elapsed<remaining (the ETA) and the rate.
    assert re.search(r"cache: 100%\|.*\| (\d+)/\1 \[\d\d:\d\d<\d\d:\d\d, +\d+(\.\d+)?img/s\]", captured.err)

    samples = scan_manifest(manifest, None, ManifestConfig(min_side=BAD_MIN_SIDE, max_caption_chars=200)).samples
    cache = CachedDataset(out, batch_size=2)
    assert len(cache) == 12 and all(not samples[i].path.name.startswith("truncated") for i in cache.sample_indices)
    # --batch-size 1: the command encoded one image / prompt per call, so encoding each again is bit-exact.
    image_encoder, text_encoder, buckets = SmokeImageEncoder(), SmokeTextEncoder(), BucketConfig()
    for i in cache.sample_indices:
        sample = samples[i]
        text = text_encoder([sample.caption])
        for resolution in (32, 48):
            height, width = buckets.buckets(resolution)[buckets.aspect_class(sample.width, sample.height)]
            got = cache.get(i, resolution)
            assert torch.equal(got["latents"], image_encoder(load_for_bucket(sample.path, height, width)[None]))
            assert got["caption"] == sample.caption
            for key in ("txt", "txt_mask", "pooled"):
                assert torch.equal(got[key], text[key]), key
    null = cache.null_condition(2)
    for key, value in text_encoder([""]).items():
        assert torch.equal(null[key], value.expand_as(null[key])), key
    # Running the command again on a finished cache writes nothing and succeeds.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert selfe.cli.main([*argv, "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "index.json"} == {
        k: v for k, v in before.items() if k != "index.json"
    }


def test_build_loaders_trains_from_the_cache_when_it_is_there(tmp_path):
    """With DataConfig.cache_dir, the training batches are the cached ones, in the image loader's order."""
    data = make_procedural_dataset(tmp_path, 16, seed=5, sizes=((96, 96), (128, 64)))
    out = tmp_path / "cache"
    schedule = ResolutionSchedule(stages=[(0, {32: 1.0}), (2, {32: 0.5, 48: 0.5})])
    config = DataConfig(
        manifest=str(data.manifest),
        checks=ManifestConfig(min_side=32),
        schedule=schedule,
        loader=LoaderConfig(batch_size=2, seed=7, num_threads=0),
        cache_dir=str(out),
    )
    images, _ = build_loaders(config)  # no cache yet: decoded images
    assert isinstance(images, ImageTextLoader)
    cache_config = CacheConfig(resolutions=(32, 48), encode_batch_size=1, num_threads=0, checks=config.checks)
    build_cache(data.manifest, out, SmokeImageEncoder(), SmokeTextEncoder(), cache_config, progress=False)
    cached, _ = build_loaders(config)
    assert isinstance(cached, CachedDataset) and cached.batches_per_epoch == images.batches_per_epoch
    encoder = SmokeImageEncoder()
    resolutions = set()
    for _ in range(10):
        from_images, from_cache = next(images), next(cached)
        assert from_cache["indices"] == from_images["indices"]
        assert from_cache["captions"] == from_images["captions"]
        expected = torch.cat([encoder(image[None]) for image in from_images["images"]])
        assert torch.equal(from_cache["latents"], expected)
        resolutions.add(tuple(from_images["images"].shape[-2:]))
    assert {(32, 32), (48, 48)} <= resolutions  # the schedule mixed both cached resolutions
    images.close()
    # A cache of another manifest is refused, not used.
    other = make_procedural_dataset(tmp_path / "other", 4, seed=1)
    with pytest.raises(ValueError, match="another manifest"):
        build_loaders(DataConfig(**{**config.__dict__, "manifest": str(other.manifest)}))


KILLED_RUN = """
import os, signal, sys
from selfe.train.cache import CacheConfig, build_cache
from selfe.train.data import ManifestConfig
from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder

manifest, root, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
encoder, calls = SmokeImageEncoder(), []


def image_encoder(images):
    calls.append(len(images))
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real kill
    return encoder(images)


config = CacheConfig(resolutions=(32, 48), shard_size=4, encode_batch_size=3, num_threads=2,
                     checks=ManifestConfig(min_side=32, scan_workers=2))
build_cache(manifest, out, image_encoder, SmokeTextEncoder(), config, base_dir=root, progress=False)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill(tmp_path):
    data = _dataset(tmp_path)
    reference = _build(data, tmp_path / "reference")
    out = tmp_path / "cache"
    args = [sys.executable, "-c", KILLED_RUN, str(data.manifest), str(data.root), str(out), "7"]
    killed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = json.loads((out / "index.json").read_text())["shards"]
    assert 0 < len(done) < reference["total_shards"]
    final = _build(data, out)
    assert final["complete"] and final["shards"] == reference["shards"]
    for entry in final["shards"]:
        if entry["file"]:
            assert (out / entry["file"]).read_bytes() == (tmp_path / "reference" / entry["file"]).read_bytes()


def test_cache_config_validation_and_store_dtype(tmp_path):
    for bad, match in [
        ({"resolutions": ()}, "non-empty and distinct"),
        ({"resolutions": (32, 32)}, "non-empty and distinct"),
        ({"resolutions": (30,)}, "multiple of 16"),
        ({"shard_size": 0}, "shard_size must be an int >= 1"),
        ({"num_threads": -1}, "num_threads must be an int >= 0"),
        ({"store_dtype": "int8"}, "store_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            CacheConfig(**bad)
    data = make_procedural_dataset(tmp_path, 4, seed=3, sizes=((64, 64),))
    config = CacheConfig(resolutions=(32,), store_dtype="bfloat16", num_threads=0, checks=CHECKS)
    build_cache(data.manifest, tmp_path / "c", SmokeImageEncoder(), SmokeTextEncoder(), config, progress=False)
    cache = CachedDataset(tmp_path / "c", batch_size=2)
    batch = next(cache)
    assert batch["latents"].dtype == batch["txt"].dtype == batch["pooled"].dtype == torch.bfloat16
    assert batch["txt_mask"].dtype == torch.bool and cache.null_condition(1)["txt"].dtype == torch.bfloat16
