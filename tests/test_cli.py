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
