"""bench/fp8_sampling.py on CPU (torchao emulates the FP8 GEMM): quality rows, the threshold that fails a
variant, the per-layer filter, and the speed rows, in one small run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torchao.float8", reason="torchao is the tested FP8 path (pip install torchao)")

from bench import fp8_sampling  # noqa: E402

ARGV = ["--preset", "tiny", "--resolution", "32", "--batch", "1", "--seeds", "2", "--iters", "1", "--txt-tokens", "16"]


@pytest.mark.slow  # three small pipelines, eager
def test_quality_speed_and_a_failing_threshold(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fp8.json"
    # a filter factor of 1 keeps every linear above the median layer's error in bf16; a PSNR floor no FP8
    # image reaches makes every variant fail, and the script exit 1
    argv = [*ARGV, "--scalings", "rowwise", "--layer-filter-factor", "1", "--min-psnr", "1000", "--json", str(out)]
    assert fp8_sampling.main(argv) == 1
    result = json.loads(out.read_text())
    quality = {row["variant"]: row for row in result["quality"]}
    assert set(quality) == {"rowwise", "rowwise+filter"}
    plain, kept = quality["rowwise"], quality["rowwise+filter"]
    assert plain["converted_linears"] == 10 and plain["excluded_by_filter"] == []
    assert kept["excluded_by_filter"] and kept["converted_linears"] == 10 - len(kept["excluded_by_filter"])
    layers = result["layer_errors"]["rowwise"]
    assert 0 < layers["median"] <= layers["max"] == max(layers["worst"].values())
    assert kept["excluded_by_filter"][0] == max(layers["worst"], key=layers["worst"].get)  # the worst goes first
    for row in quality.values():
        assert 0 < row["relative_error_max"] < 0.05 and 30 < row["psnr_min"] < 1000  # FP8 ran, and is close
        assert row["passed"] is False  # the PSNR floor was crossed
    assert [(r["variant"], r["batch"]) for r in result["speed"]] == [
        ("bf16", 1),
        ("rowwise", 1),
        ("rowwise+filter", 1),
    ]
    assert result["speed"][0]["step_speedup"] == 1.0 and all(r["step_ms"] > 0 for r in result["speed"])
    assert "**FAIL**" in capsys.readouterr().out


def test_arguments_are_checked_before_any_model(capsys) -> None:
    for argv, message in [
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--max-relative-error", "nan"], "--max-relative-error must be a finite number >= 0"),
        (["--resolution", "30"], "--resolution must be a multiple of"),
        (["--batch", "0"], "--batch values must be >= 1"),
    ]:
        with pytest.raises(SystemExit):
            fp8_sampling.parse_args([*ARGV, *argv])
        assert message in capsys.readouterr().err
