"""selfe.utils.atomic: whole-or-nothing writes with ordinary file modes, and the output-folder check."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from selfe.utils.atomic import atomic_write_bytes, atomic_write_json, folder_problem


def test_a_write_has_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "new" / "atomic", b"data")  # missing folders are made
    assert (tmp_path / "new" / "atomic").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "new" / "atomic").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})  # not JSON: fails before any byte is written
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text, not bytes")  # type: ignore[arg-type]  # fails inside the temp file
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_folder_problem_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "a_file") == f"{tmp_path / 'a_file'} is a file, not a folder"
    assert folder_problem(tmp_path / "a_file" / "x" / "y") == f"{tmp_path / 'a_file'} is a file, not a folder"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert folder_problem(locked / "out") == f"{locked} is not writable"
