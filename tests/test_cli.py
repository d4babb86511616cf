"""The `selfe` console command: installed, lists its subcommands, routes them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfe.cli import main


def test_console_script_is_installed_and_lists_subcommands():
    beside_python = Path(sys.executable).parent / "selfe"
    exe = str(beside_python) if beside_python.exists() else shutil.which("selfe")
    assert exe, "the `selfe` console script is not on PATH (pip install -e . installs it)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in ("toy2d", "train", "generate", "cache"))


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "toy2d" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error():
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_cache_routes_to_its_own_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "--help"])
    assert exit_info.value.code == 0
    assert "--manifest" in capsys.readouterr().out


def test_train_without_its_data_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """A missing manifest is exit 2 and one line naming it (and, for ShapesEval, the command that makes it),
    not a traceback; the failed start leaves no process group behind."""
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)  # no data/ here
    argv = ["train", "shapes-selfe-ae", "data.manifest=missing/train.tsv", f"run_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing/train.tsv does not exist" in err and "Traceback" not in err
    assert "`selfe data shapes --autoencoder trained`" in err and "run that first" in err
    assert not dist.is_initialized()
