"""`selfe --version`: the package's version, the same as the installed distribution's."""

from __future__ import annotations

import importlib.metadata

import pytest

import selfe
from selfe.cli import main


def test_version_prints_and_exits_0(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"selfe {selfe.__version__}\n"


def test_version_is_the_installed_distributions() -> None:
    assert selfe.__version__ == importlib.metadata.version("selfe")
