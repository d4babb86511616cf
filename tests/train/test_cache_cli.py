"""`selfe cache` input checks with real-format encoders: a missing, wrong or corrupt input is one line on stderr
and exit status 2, before --out is created."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from selfe.components.autoencoder import AutoEncoder, AutoEncoderConfig, save_autoencoder, tiny
from selfe.train.cache_cli import cache_main
from selfe.train.data import CachedDataset
from tests.helpers_data import make_procedural_dataset
from tests.helpers_text import forbid_network_and_unpickling, make_tiny_clip_snapshot, make_tiny_t5_snapshot

# Four levels: FLUX.1's 8x downsampling (what the cache stores), at test size.
AE_8X = AutoEncoderConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16, norm_groups=4)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network_and_unpickling(monkeypatch)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real-format encoders, built once: ae.safetensors, t5/ and clip/, plus broken variants."""
    root = tmp_path_factory.mktemp("weights")
    make_tiny_t5_snapshot(root / "t5")
    make_tiny_clip_snapshot(root / "clip")
    torch.manual_seed(0)
    save_autoencoder(AutoEncoder(AE_8X).eval(), root / "ae.safetensors")
    raw = (root / "ae.safetensors").read_bytes()
    (root / "ae_truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    save_autoencoder(AutoEncoder(tiny()).eval(), root / "ae_2x.safetensors")
    shutil.copytree(root / "t5", root / "t5_truncated")
    weights_file = root / "t5_truncated" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    shutil.copytree(root / "t5", root / "t5_no_config")
    (root / "t5_no_config" / "config.json").unlink()
    return root


def _argv(tmp_path: Path, weights: Path, **paths: str | Path) -> tuple[list[str], Path]:
    data = make_procedural_dataset(tmp_path / "data", 3, seed=4, sizes=((64, 64),))
    out = tmp_path / "cache"
    argv = ["--manifest", str(paths.pop("manifest", data.manifest)), "--out", str(paths.pop("out", out))]
    argv += ["--resolution", "32", "--min-side", "32", "--device", "cpu", "--no-progress"]
    encoders = {"ae": weights / "ae.safetensors", "t5": weights / "t5", "clip": weights / "clip", **paths}
    for flag, path in encoders.items():
        argv += [f"--{flag.replace('_', '-')}", str(path)]
    return argv, out


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one error line of a run that must fail with exit status 2."""
    assert cache_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfe cache: error: ") and "\n" not in err, err
    return err


def test_real_encoders_build_a_cache(tmp_path, weights):
    argv, out = _argv(tmp_path, weights)
    assert cache_main(argv) == 0
    assert next(CachedDataset(out, batch_size=3))["latents"].shape == (3, 16, 4, 4)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ({"t5": "missing_t5"}, "--t5 "),
        ({"clip": "ae.safetensors"}, "--clip "),  # a file, not a snapshot folder
        ({"t5_tokenizer": "missing_tok"}, "--t5-tokenizer "),
        ({"ae": "missing.safetensors"}, "--ae "),
        ({"ae": "t5"}, "--ae "),  # a folder, not a weights file
        ({"ae": "ae_truncated.safetensors"}, "ae_truncated.safetensors"),
        ({"ae": "ae_2x.safetensors"}, "downsamples by 2"),
        ({"t5": "t5_truncated"}, "t5_truncated"),
        ({"t5": "t5_no_config"}, "config.json"),
        ({"t5": "clip"}, "--t5"),  # another model's snapshot: the T5 tokenizer cannot read CLIP's
    ],
)
def test_missing_or_corrupt_encoders_are_one_line_errors(tmp_path, weights, capsys, paths, expected):
    argv, out = _argv(tmp_path, weights, **{k: weights / v for k, v in paths.items()})
    assert expected in _error(capsys, argv)
    assert not out.exists()


def test_bad_manifest_leaves_no_output_folder(tmp_path, weights, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"no_tab_line\nmissing.png\ta caption\n")
    argv, out = _argv(tmp_path, weights, manifest=bad)
    assert "has no usable row" in _error(capsys, argv)
    assert not out.exists()
    argv, out = _argv(tmp_path, weights, manifest=tmp_path / "nowhere.tsv")
    assert "nowhere.tsv does not exist" in _error(capsys, argv)
    assert not out.exists()
    # The smoke encoders take the same path through build_cache.
    assert "has no usable row" in _error(capsys, ["--smoke", "--manifest", str(bad), "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--dtype", "fp64"], "dtype"),
        (["--device", "bogus"], "--device"),
        (["--device", "cuda:99"], "--device"),
        (["--t5-max-length", "0"], "--t5-max-length"),
        (["--shard-size", "0"], "shard_size"),
    ],
)
def test_bad_options_fail_before_loading(tmp_path, weights, capsys, monkeypatch, extra, expected):
    refuse = lambda *a, **k: pytest.fail("loaded the autoencoder")
    monkeypatch.setattr("selfe.components.autoencoder.load_autoencoder", refuse)
    argv, out = _argv(tmp_path, weights)
    with pytest.raises(SystemExit) as exc:
        cache_main([*argv, *extra])
    assert exc.value.code == 2 and expected in capsys.readouterr().err
    assert not out.exists()


def test_out_that_cannot_be_a_folder_or_a_corrupt_index(tmp_path, weights, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out in (a_file, a_file / "cache"):
        argv, _ = _argv(tmp_path, weights, out=out)
        assert "not a folder" in _error(capsys, argv)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text("{not json")
    argv, _ = _argv(tmp_path, weights, out=broken)
    assert "index.json" in _error(capsys, [*argv[: argv.index("--ae")], "--smoke"])
