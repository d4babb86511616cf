"""bench/compile_time.py compiles the model with and without nested regions, in fresh processes, and agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import compile_time


@pytest.mark.slow
def test_both_settings_run_and_match_eager(tmp_path: Path, capsys) -> None:
    out = tmp_path / "compile.json"
    argv = ["--preset", "tiny", "--depth", "2", "2", "--resolution", "32", "--txt-tokens", "8"]
    compile_time.main([*argv, "--backend", "aot_eager", "--iters", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["regions"] for row in rows] == [False, True]
    assert all(row["first_call_s"] > 0 and row["call_ms"] > 0 and row["max_abs_diff"] < 1e-5 for row in rows)
    assert "| on |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--depth", "0", "0"], "at least one block"),
        (["--resolution", "40"], "multiple of 16"),
        (["--iters", "0"], ">= 1"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compile_time.parse_args(["--preset", "tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
