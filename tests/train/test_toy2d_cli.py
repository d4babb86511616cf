"""`selfe toy2d` argument checks: every invalid value is one line on stderr and exit status 2, before training."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from selfe.cli import main as selfe_main
from selfe.train.toy2d import cli as toy2d_cli

# A tiny run, so that a check which is missing costs a second of training rather than minutes.
TINY = ["--iterations", "2", "--batch-size", "8", "--eval-samples", "16", "--steps", "1", "--jobs", "1"]
TINY_SET = ["width=8", "depth=1", "log_every=1"]


def _rejects(capsys: pytest.CaptureFixture, out: Path, *argv: str, sets: tuple[str, ...] = ()) -> str:
    """Run `selfe toy2d` with a bad argument; the error line (exit 2, one line, --out untouched)."""
    with pytest.raises(SystemExit) as exc:
        selfe_main(["toy2d", "--out", str(out), *TINY, *argv, "--set", *TINY_SET, *sets])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfe toy2d: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--iterations", "0"], "iterations >= 1"),
        (["--eval-samples", "0"], "eval_samples"),
        (["--batch-size", "1"], "batch_size >= 2"),
        (["--steps", "1", "0"], "steps"),
        (["--guidance", "nan"], "--guidance"),
        (["--guidance", "inf"], "--guidance"),
        (["--seed", str(2**64 - 50)], "seed"),  # seed + 100 seeds a generator
        (["--threads", "0"], "--threads"),
        (["--jobs", "0"], "--jobs"),
    ],
)
def test_rejects_bad_options(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    assert expected in _rejects(capsys, out, *argv)
    assert not out.exists()


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("lr=-1", "lr"),
        ("lr=nan", "lr"),
        ("weight_decay=-0.1", "weight_decay"),
        ("grad_clip=inf", "grad_clip"),
        ("grad_clip=0", "grad_clip"),
        ("width=0", "width"),
        ("depth=0", "depth"),
        ("ema_decay=1", "decay"),
        ("ema_decay=nan", "decay"),
        ("caption_dropout=1", "caption_dropout"),
        ("tau_warmup_fraction=inf", "tau_warmup_fraction"),
        ("tau_warmup_fraction=nan", "tau_warmup_fraction"),
        ("aux_start_fraction=-1", "aux_start_fraction"),
        ("aux_start_fraction=inf", "aux_start_fraction"),
        ("aux_start_fraction=1e308", "aux_start_fraction"),  # int(fraction * iterations) overflowed
        ("tau_warmup_fraction=1e308", "tau_warmup_fraction"),
        ("aux_k=2", "aux_k"),
        ("time_shift_mu=inf", "mu"),
        ("time_shift_mu=710", "time_shift_mu"),  # math.exp overflowed in training
        ("guidance=nan", "guidance"),
        ("sampler_method=heun", "sampler method"),
        ("log_every=0", "log_every"),
        ("eval_samples=-3", "eval_samples"),
        ("steps=1,x", "steps"),
        ("steps=", "steps"),
        ("iterations=none", "iterations"),
        ("fresh_self_eval_noise=none", "fresh_self_eval_noise"),
        ("fresh_self_eval_noise=maybe", "true or false"),
        ("width=1.5", "width"),
        ("data=x", "KEY=VALUE"),
        ("width", "KEY=VALUE"),
    ],
)
def test_rejects_bad_set_values(tmp_path, capsys, item, expected):
    out = tmp_path / "out"
    assert expected in _rejects(capsys, out, sets=(item,))
    assert not out.exists()


def _bad_npz_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.randn(50, 2), y=np.arange(50) % 3)
    files = {"missing": tmp_path / "missing.npz", "folder": tmp_path}
    files["text"] = tmp_path / "text.npz"
    files["text"].write_text("not an archive")
    files["empty"] = tmp_path / "empty.npz"
    files["empty"].write_bytes(b"")
    files["truncated"] = tmp_path / "truncated.npz"
    files["truncated"].write_bytes(good.read_bytes()[:200])
    files["npy"] = tmp_path / "plain.npy"
    np.save(files["npy"], np.zeros((50, 2)))
    arrays = {
        "strings": {"x": np.array([["a", "b"]] * 50), "y": np.arange(50) % 3},
        "complex": {"x": np.ones((50, 2), complex), "y": np.arange(50) % 3},
        "overflow": {"x": np.full((50, 2), 1e300), "y": np.arange(50) % 3},
        "empty_arrays": {"x": np.zeros((0, 2)), "y": np.zeros(0, np.int64)},
        "huge_label": {"x": np.ones((50, 2)), "y": np.arange(50, dtype=np.uint64) + 2**63},
        "objects": {"x": np.array([[1.0, None]] * 50, dtype=object), "y": np.arange(50)},
    }
    for name, content in arrays.items():
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], **content)
    return files


BAD_DATA = ["missing", "folder", "text", "empty", "truncated", "npy", "strings", "complex", "overflow",
            "empty_arrays", "huge_label", "objects"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_DATA)
def test_rejects_bad_data_files(tmp_path, capsys, kind):
    data = _bad_npz_files(tmp_path)[kind]
    out = tmp_path / "out"
    assert "--data" in _rejects(capsys, out, "--data", str(data))
    assert not out.exists()


def test_rejects_out_under_a_file_or_being_a_file(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "not a folder" in _rejects(capsys, a_file / "sub" / "out")
    assert "not a folder" in _rejects(capsys, a_file)
    assert a_file.read_text() == ""


def test_none_is_accepted_only_where_the_field_allows_it():
    parser = argparse.ArgumentParser()
    toy2d_cli.add_arguments(parser)
    args = parser.parse_args(["--set", "aux_start_fraction=none", "guidance=none", "steps=1,3", "width=16"])
    config = toy2d_cli.config_from_args(args)
    assert config.aux_start_fraction is None and config.guidance is None
    assert config.steps == (1, 3) and config.width == 16
