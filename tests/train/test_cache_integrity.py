"""A cache's files are checked against the checksums in its index: a corrupted shard of the right size, a
truncated one, or a damaged null file is an error naming it (never trained on), and resuming the build
encodes it again. Caches from before checksums are checked by size, with a warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from selfe.train.cache import CacheConfig, build_cache
from selfe.train.config import DataSection, preset
from selfe.train.data import CachedDataset, ManifestConfig
from selfe.train.data.cached import DamagedCacheError
from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder
from selfe.train.sources import build_source
from tests.helpers_data import make_procedural_dataset
from tests.helpers_text import forbid_network_and_unpickling

CONFIG = CacheConfig(resolutions=(32,), shard_size=4, encode_batch_size=4, num_threads=0,
                     checks=ManifestConfig(min_side=32, scan_workers=1))  # fmt: skip


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network_and_unpickling(monkeypatch)


def _build(root: Path) -> dict:
    """Build (or resume) ROOT/cache from ROOT/data."""
    data = root / "data"
    return build_cache(data / "manifest.tsv", root / "cache", SmokeImageEncoder(), SmokeTextEncoder(), CONFIG,
                       base_dir=data, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A folder with data/ (8 images) and cache/ (2 shards of 4); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("integrity")
    make_procedural_dataset(root / "data", 8, seed=2, sizes=((64, 64),))
    index = _build(root)
    assert index["complete"] and len(index["shards"]) == 2
    return root


@pytest.fixture
def cache(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "copy")  # data and cache together: the cache resumes from there
    return tmp_path / "copy" / "cache"


def _flip_last_byte(path: Path) -> None:
    """Same size, one bit of the last tensor's data changed: the header still reads."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _read_all(cache: Path, **kwargs) -> int:
    dataset = CachedDataset(cache, batch_size=2, shuffle=False, **kwargs)
    return sum(len(batch["indices"]) for batch in dataset.iter_epoch(0))


def test_every_file_has_its_checksum_in_the_index(cache):
    index = json.loads((cache / "index.json").read_text())
    for entry in [*index["shards"], index["null"]]:
        assert len(entry["sha256"]) == 64 and entry["bytes"] == (cache / entry["file"]).stat().st_size
    assert _read_all(cache) == 8


def test_a_corrupted_shard_of_the_right_size_is_named_not_trained_on(cache):
    shard = cache / "shard-000001.safetensors"
    _flip_last_byte(shard)
    with pytest.raises(DamagedCacheError, match=f"cache file {shard} is damaged: its SHA-256 .*selfe cache"):
        _read_all(cache)
    assert _read_all(cache, verify=False) == 8  # what the check catches: the bytes still read


def test_a_truncated_shard_is_named(cache):
    shard = cache / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DamagedCacheError, match=f"cache file {shard} cannot be read .*incomplete"):
        CachedDataset(cache, batch_size=2)


def test_a_damaged_null_file_is_named(cache):
    _flip_last_byte(cache / "null.safetensors")
    dataset = CachedDataset(cache, batch_size=2)
    with pytest.raises(DamagedCacheError, match="null.safetensors is damaged"):
        dataset.null_condition(2)


def test_resuming_the_build_encodes_a_damaged_shard_again(built, cache, caplog):
    shard = cache / "shard-000001.safetensors"
    _flip_last_byte(shard)
    untouched = (cache / "shard-000000.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="selfe.train.cache"):
        index = _build(cache.parent)
    assert f"cache file {shard} is damaged" in caplog.text and "encoding it again" in caplog.text
    assert index["complete"] and shard.read_bytes() == (built / "cache" / shard.name).read_bytes()
    assert (cache / "shard-000000.safetensors").stat().st_mtime_ns == untouched  # an intact shard is kept
    assert _read_all(cache) == 8


def test_a_cache_from_before_checksums_is_checked_by_size_with_a_warning(cache, caplog):
    index = json.loads((cache / "index.json").read_text())
    for entry in [*index["shards"], index["null"]]:
        del entry["sha256"]
    (cache / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING):
        assert _read_all(cache) == 8
    assert "2 of its 2 shards have no checksum" in caplog.text
    (cache / "shard-000000.safetensors").write_bytes(b"\0" * 8)  # another size: still caught
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        index = _build(cache.parent)
    assert "shard-000000.safetensors is damaged: 8 bytes" in caplog.text
    assert "1 shards from before checksums" in caplog.text and index["complete"]


def test_the_trainer_checks_its_cache_unless_told_not_to(tmp_path):
    data = make_procedural_dataset(tmp_path, 4, seed=1, sizes=((96, 96),))
    text = SmokeTextEncoder(32, 16, max_length=8)  # the smoke model's widths
    build_cache(data.manifest, tmp_path / "cache", SmokeImageEncoder(), text, CONFIG, progress=False)
    shard = tmp_path / "cache" / "shard-000000.safetensors"
    _flip_last_byte(shard)
    section = DataSection(source="cache", cache_dir=str(tmp_path / "cache"), resolution=32, batch_size=2)
    with pytest.raises(DamagedCacheError, match=str(shard)):
        build_source(section, preset("smoke").model, 0, 1, 1).next_step(want_fake=False)
    section.cache_verify = False
    assert build_source(section, preset("smoke").model, 0, 1, 1).next_step(want_fake=False)[0]["x0"].shape[0] == 2
