"""bench/cold_start.py: its arguments (the two-process run itself is tests/engine/test_compile_cache.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import cold_start


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--resolution", "-16"], "--resolution must be >= 1"),
        (["--model", "/nonexistent/model"], "is not a directory"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cold_start.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_defaults(tmp_path: Path) -> None:
    args = cold_start.parse_args(["--model", str(tmp_path)])
    assert (args.steps, args.batch, args.parts, args.resolution, args.one) == (2, 1, "all", None, None)
