"""`selfe data shapes` on an existing folder and on bad arguments: a rerun with the same arguments works
(and reuses a trained autoencoder), other settings are refused before anything is written, and every
user mistake is a one-line error, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfe.shapes.data import AE_CACHE, AE_FILE, AE_REPORT, CACHE, data_main

BASE = ["shapes", "--num", "4", "--no-progress"]


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        data_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_rerun_works_and_other_settings_are_refused_with_nothing_written(tmp_path, capsys):
    out = tmp_path / "d"
    args = [*BASE, "--out", str(out)]
    assert data_main(args) == 0
    index = (out / CACHE / "index.json").read_bytes()
    assert data_main(args) == 0  # the same arguments: the cache resumes (already complete)
    assert (out / CACHE / "index.json").read_bytes() == index
    before = _files(out)
    for extra, setting in [
        (["--num", "5"], "--num 4, not 5"),
        (["--seed", "1"], "another --seed"),
        (["--t5-order-bias", "8"], "another --t5-order-bias"),
    ]:
        err = _fails([*args, *extra], capsys)
        assert err.startswith("selfe data shapes: ") and len(err.strip().splitlines()) == 1, err
        assert setting in err and "new --out folder" in err
        assert _files(out) == before  # nothing rewritten: the cache still matches the folder
    assert data_main(args) == 0


def test_a_cache_mismatch_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "d"
    assert data_main([*BASE, "--out", str(out)]) == 0
    index = json.loads((out / CACHE / "index.json").read_text())
    index["fingerprint"] = "another"  # the backstop: what the up-front checks cannot see
    (out / CACHE / "index.json").write_text(json.dumps(index))
    err = _fails([*BASE, "--out", str(out)], capsys)
    assert err.startswith("selfe data shapes: ") and len(err.strip().splitlines()) == 1, err
    assert "holds a cache built from another manifest or config" in err


@pytest.mark.slow
def test_a_trained_autoencoder_is_reused_and_other_steps_are_refused(tmp_path, capsys):
    out = tmp_path / "d"
    args = [*BASE, "--out", str(out), "--autoencoder", "trained", "--ae-steps", "1", "--device", "cpu"]
    assert data_main(args) == 0
    trained = (out / AE_FILE).stat().st_mtime_ns
    assert data_main(args) == 0
    assert (out / AE_FILE).stat().st_mtime_ns == trained  # not retrained: its cache stays valid
    assert json.loads((out / AE_CACHE / "index.json").read_text())["complete"]
    before = _files(out)
    err = _fails([*args, "--ae-steps", "2"], capsys)
    assert err.startswith("selfe data shapes: ") and "--ae-steps 1, not 2" in err
    assert _files(out) == before
    report = json.loads((out / AE_REPORT).read_text())
    del report["training"]  # a folder from before the training was recorded: retraining would orphan cache-ae/
    (out / AE_REPORT).write_text(json.dumps(report))
    before = _files(out)
    assert "unrecorded training settings" in _fails(args, capsys)
    assert _files(out) == before


def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "file").write_text("x")
    for extra, message in [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--device", "cuda"], "--device cuda: this torch has no CUDA device"),
        (["--device", "cuda:0"], "this torch has no CUDA device"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--t5-order-bias", "nan"], "--t5-order-bias must be finite"),
        (["--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["--out", str(tmp_path / "file" / "d")], "is a file, not a folder"),
    ]:
        err = _fails([*BASE, "--out", str(tmp_path / "d"), *extra], capsys)
        assert message in err.splitlines()[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written
