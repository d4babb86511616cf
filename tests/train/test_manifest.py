"""Manifest scanning: every kind of bad row is skipped and counted by reason; good rows all load."""

from __future__ import annotations

import logging

import pytest
import torch

from selfe.train.data import (
    REASONS,
    DataConfig,
    EmptyManifestError,
    ImageTextLoader,
    LoaderConfig,
    ManifestConfig,
    ResolutionSchedule,
    build_loaders,
    scan_manifest,
)
from tests.helpers_data import BAD_MAX_CAPTION_CHARS, BAD_MIN_SIDE, BAD_ROWS, make_bad_manifest, make_procedural_dataset

CHECKS = ManifestConfig(min_side=BAD_MIN_SIDE, max_caption_chars=BAD_MAX_CAPTION_CHARS, scan_workers=2)


def _bad_manifest(tmp_path):
    return make_bad_manifest(tmp_path, 12, seed=1)


EXPECTED_SCAN = {
    "malformed_line": 2,
    "non_utf8_caption": 1,
    "empty_caption": 1,
    "overlong_caption": 1,
    "missing_file": 1,
    "unreadable_image": 2,
    "tiny_image": 1,
    "undecodable_image": 0,
}


def test_scan_counts_every_reason(tmp_path, caplog):
    data, path = _bad_manifest(tmp_path)
    assert {reason for _, reason in BAD_ROWS} == set(REASONS)  # every kind of bad row is in the manifest
    with caplog.at_level(logging.WARNING, logger="selfe.train.data.manifest"):
        manifest = scan_manifest(path, tmp_path, CHECKS)
    counts = manifest.stats.as_dict()
    assert {k: counts[k] for k in EXPECTED_SCAN} == EXPECTED_SCAN
    assert counts["rows_total"] == 12 + 11
    assert counts["rows_ok"] == 12 + 2  # the two truncated images pass the header scan
    assert [s.caption for s in manifest.samples if s.path.parent.name == "images"] == data.captions
    # Each bad row is logged with its manifest line number: line 2 is the first bad row ("no tab here").
    assert any(f"{path}:2 (malformed_line)" in r.getMessage() for r in caplog.records)
    logged = {
        int(r.getMessage().split(f"{path}:")[1].split(" ")[0]) for r in caplog.records if f"{path}:" in r.getMessage()
    }
    lines = path.read_bytes().splitlines()
    scan_time = [row for row, reason in BAD_ROWS if reason != "undecodable_image"]
    assert logged == {lines.index(row) + 1 for row in scan_time}  # every bad row, by its line number
    sizes = {s.path.name: (s.width, s.height) for s in manifest.samples}
    assert sizes["00003.png"] == data.sizes[3]


def test_loader_skips_undecodable_images_and_counts_them_once(tmp_path):
    data, path = _bad_manifest(tmp_path)
    manifest = scan_manifest(path, tmp_path, CHECKS)
    truncated = {i for i, s in enumerate(manifest.samples) if s.path.name.startswith("truncated")}
    assert len(truncated) == 2
    loader = ImageTextLoader(
        manifest,
        schedule=ResolutionSchedule.fixed(64),
        config=LoaderConfig(batch_size=2, shuffle=False, remainder="pad", num_threads=2),
    )
    seen, batches = set(), 0
    for _ in range(2):  # two epochs: the truncated images come up again but count once
        for batch in loader.iter_epoch():
            images = batch["images"]
            assert images.ndim == 4 and images.shape[1] == 3 and len(batch["captions"]) == images.shape[0] == 2
            assert images.dtype == torch.float32 and -1.0 <= images.min() <= images.max() <= 1.0
            seen.update(batch["indices"])
            batches += 1
    assert seen == set(range(len(manifest.samples))) - truncated  # every good row loads, substitutes fill in
    counts = loader.stats.as_dict()
    assert counts["undecodable_image"] == 2
    assert counts["rows_ok"] == 12
    assert {k: counts[k] for k in EXPECTED_SCAN if k != "undecodable_image"} == {
        k: v for k, v in EXPECTED_SCAN.items() if k != "undecodable_image"
    }
    state = loader.state_dict()
    assert sorted(state["undecodable"]) == sorted(truncated)
    loader.close()


def test_all_bad_manifest_raises_with_counts(tmp_path):
    (tmp_path / "m.tsv").write_bytes(b"no_tab_line\nmissing.png\ta caption\nx.png\t\n")
    with pytest.raises(EmptyManifestError, match=r"m\.tsv has no usable row.*malformed_line=1.*missing_file=1"):
        scan_manifest(tmp_path / "m.tsv", tmp_path, CHECKS)
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        scan_manifest(tmp_path / "nowhere.tsv")


def test_header_and_absolute_paths(tmp_path):
    data = make_procedural_dataset(tmp_path / "d", 3)
    rows = ["path\tprompt"] + [f"{data.root / p}\t{c}" for p, c in zip(data.paths, data.captions)]
    (tmp_path / "abs.tsv").write_text("\n".join(rows), encoding="utf-8")
    manifest = scan_manifest(tmp_path / "abs.tsv", "/nonexistent", ManifestConfig(min_side=32, has_header=True))
    assert [s.caption for s in manifest.samples] == data.captions
    assert [s.line for s in manifest.samples] == [2, 3, 4]


def test_config_validation():
    with pytest.raises(ValueError, match="min_side"):
        ManifestConfig(min_side=0)


def test_build_loaders_with_validation_manifest(tmp_path):
    train = make_procedural_dataset(tmp_path, 8, seed=1, sizes=((64, 64),))
    val = make_procedural_dataset(tmp_path, 5, seed=2, sizes=((64, 64),), manifest_name="val.tsv")
    config = DataConfig(
        manifest=str(train.manifest),
        val_manifest=str(val.manifest),
        checks=ManifestConfig(min_side=32),
        schedule=ResolutionSchedule.fixed(32),
        loader=LoaderConfig(batch_size=2, num_threads=0),
    )
    train_loader, val_loader = build_loaders(config)
    assert next(train_loader)["images"].shape == (2, 3, 32, 32)
    # Validation: file order, last batch padded from the start, so every row appears.
    captions = [c for b in val_loader.iter_epoch() for c in b["captions"]]
    assert captions == val.captions + val.captions[:1]
    assert build_loaders(DataConfig(**{**config.__dict__, "val_manifest": None}))[1] is None
    with pytest.raises(ValueError, match="manifest is empty"):
        build_loaders(DataConfig())
