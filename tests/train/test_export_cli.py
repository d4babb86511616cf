"""`selfe export` on user mistakes: an --out that overlaps the checkpoint, a failing write, a damaged
checkpoint. Each is a one-line exit-2 error that names the path, and leaves nothing behind."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfe.cli import main
from selfe.components.weights import load_safetensors_into
from selfe.network.model import MMDiT
from selfe.sampling.pipeline_files import read_pipeline_config
from selfe.train.export import export_ema
from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import tiny_config

STEP = f"step_{1:09d}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-step run with its checkpoint (tests copy it before changing anything)."""
    root = tmp_path_factory.mktemp("export") / "run"
    trainer = Trainer(tiny_config(root, 1, "checkpoint.every=1", "checkpoint.keep=1"))
    try:
        trainer.train()
    finally:
        trainer.close()
    return root


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _exit_2(argv: list[str], capsys) -> str:
    """stderr of `selfe export ARGV`, which must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _refused(argv: list[str], capsys) -> str:
    err = _exit_2(argv, capsys)
    assert err.startswith("selfe export: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_an_out_that_is_holds_or_lies_in_the_checkpoint_is_refused_untouched(run, tmp_path, capsys):
    src = tmp_path / "run"
    shutil.copytree(run, src)
    before = _files(tmp_path)
    step = src / "checkpoints" / STEP
    for source, out in [
        (src, src),  # used to delete the whole run
        (src, src / "checkpoints"),
        (src, tmp_path),  # holds it
        (src, step / "x"),  # inside the checkpoint read from the run
        (step, step / "x"),
        (step, tmp_path / "run" / "checkpoints"),
    ]:
        assert "lies inside the checkpoint" in _refused([str(source), "--out", str(out)], capsys)
    assert _files(tmp_path) == before
    # OUT.old / OUT.tmp are deleted by the export too: a checkpoint there is the source as well
    old = tmp_path / "a.old"
    shutil.copytree(step, old)
    before = _files(tmp_path)
    _refused([str(old), "--out", str(tmp_path / "a")], capsys)
    assert _files(tmp_path) == before
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    before = _files(tmp_path)
    assert "is a file" in _refused([str(step), "--out", str(tmp_path / "file")], capsys)
    assert "not an export" in _refused([str(step), "--out", str(tmp_path / "notes")], capsys)
    assert _files(tmp_path) == before
    # an export outside the checkpoint still works, and replaces an earlier export; RUN/export (where the
    # trainer exports) is outside the checkpoint it reads
    for out in (tmp_path / "exported", tmp_path / "exported", src / "export"):
        assert main(["export", str(src), "--out", str(out)]) == 0
        assert load_file(out / "model.safetensors")
    assert not (tmp_path / "exported.tmp").exists() and not (tmp_path / "exported.old").exists()
    assert (step / "meta.json").is_file()


def test_a_failing_export_leaves_no_tmp_folder_and_the_old_export_intact(tmp_path):
    config = tiny_config(tmp_path / "r", 1)
    net = MMDiT(config.model)
    out = export_ema(net, config, tmp_path / "out")
    weights = (out / "model.safetensors").read_bytes()
    missing = tmp_path / "missing"  # copying the text encoders fails after the weights are written
    paths = (f"data.t5_path={missing}", f"data.clip_path={missing}")
    failing = tiny_config(tmp_path / "r", 1, "checkpoint.export_text_encoders=true", *paths)
    with pytest.raises(FileNotFoundError):
        export_ema(net, failing, out)
    assert not (tmp_path / "out.tmp").exists()
    assert (out / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_export_stores_the_rounded_weights_in_half_the_bytes(dtype, tmp_path):
    net = MMDiT(tiny_config(tmp_path / "r", 1).model)
    full = export_ema(net, tiny_config(tmp_path / "r", 1), tmp_path / "full")
    half = export_ema(net, tiny_config(tmp_path / "r", 1, f"checkpoint.export_dtype={dtype}"), tmp_path / "half")
    stored = load_file(half / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {getattr(torch, dtype)}
    for name, weight in net.state_dict().items():
        assert torch.equal(stored[name], weight.to(getattr(torch, dtype))), name
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    again = load_safetensors_into(MMDiT(tiny_config(tmp_path / "r", 1).model), half / "model.safetensors")
    for name, weight in again.state_dict().items():  # the loader casts to the model's dtype
        assert weight.dtype == torch.float32 and torch.equal(weight, stored[name].float()), name


@pytest.mark.slow
def test_selfe_export_dtype_overrides_the_runs_setting_and_records_it(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out), "--dtype", "float16"]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    assert '"export_dtype": "float16"' in (out / "train_config.json").read_text()
    assert "invalid choice: 'fp8'" in _exit_2([str(run), "--out", str(out), "--dtype", "fp8"], capsys)


@pytest.mark.slow
def test_selfe_export_guidance_sets_the_exports_default_and_records_it(run, tmp_path, capsys):
    """A re-export changes the default EP-CFG omega that sampling reads from config.json, without retraining."""
    for flags, expected in ([["--guidance", "1.5"], 1.5], [["--no-guidance"], None]):
        out = tmp_path / str(expected)
        assert main(["export", str(run), "--out", str(out), *flags]) == 0
        assert json.loads((out / "config.json").read_text())["sampler"]["guidance"] == expected
        assert json.loads((out / "train_config.json").read_text())["checkpoint"]["export_guidance"] == expected
        assert read_pipeline_config(out)["sampler"].guidance == expected  # what from_pretrained samples with
    for bad in ("-1", "nan"):
        assert "export_guidance must be a finite number >= 0" in _refused(
            [str(run), "--out", str(out), "--guidance", bad], capsys
        )
    assert "not allowed with" in _exit_2([str(run), "--out", str(out), "--guidance", "2", "--no-guidance"], capsys)


def _truncate(name: str, size: int) -> Callable[[Path], Path]:
    def damage(step: Path) -> Path:
        path = step / name
        path.write_bytes(path.read_bytes()[:size])
        return path

    return damage


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def damage(step: Path) -> Path:
        (step / name).write_bytes(data)
        return step / name

    return damage


def _remove(name: str) -> Callable[[Path], Path]:
    def damage(step: Path) -> Path:
        (step / name).unlink()
        return step / name

    return damage


DAMAGES = {
    "distcp truncated": _truncate("__0_0.distcp", 1000),  # dcp reads only the EMA entries: cut before them
    "distcp empty": _truncate("__0_0.distcp", 0),
    "distcp missing": _remove("__0_0.distcp"),
    "metadata truncated": _truncate(".metadata", 1000),
    "metadata empty": _truncate(".metadata", 0),
    "metadata garbage": _write(".metadata", b"\x80\x05not a pickle at all" * 8),
    "config empty": _write("config.json", b""),
    "config not utf-8": _write("config.json", b"\xff\xfe{\x00"),
    "config a list": _write("config.json", b"[]"),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(damage, run, tmp_path, capsys, caplog):
    step = tmp_path / STEP
    shutil.copytree(run / "checkpoints" / STEP, step)
    damaged = damage(step)
    with caplog.at_level(logging.WARNING):
        err = _refused([str(step), "--out", str(tmp_path / "out")], capsys)
    assert str(step) in err and "Traceback" not in err
    if damaged.name == ".metadata":
        assert str(damaged) in err
        # read up front: dcp's fallback on per-rank metadata, which logs two tracebacks, is never reached
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
