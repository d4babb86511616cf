"""bench/sample_throughput.py runs on CPU with the tiny preset and reports what the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sample_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("sample_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_throughput_cpu_smoke(tmp_path: Path, capsys) -> None:
    bench = load_bench()
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--resolution", "32", "--batch", "1", "2", "--steps", "1", "2"]
    argv += ["--variants", "eager", "compiled", "compiled+graph", "--compile-backend", "aot_eager"]
    argv += ["--iters", "1", "--txt-tokens", "32", "--text-bucket", "4", "--profile-kernels", "4", "--json", str(out)]
    result = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["skipped_variants"] == ["compiled+graph"]  # no CUDA here
    points = {(r["batch"], r["variant"], r["steps"]) for r in result["rows"]}
    assert points == {(b, v, s) for b in (1, 2) for v in ("eager", "compiled") for s in (1, 2)}
    assert result["peak_flops"] == 989e12  # a CPU is not in the peak table: the H100's
    for row in result["rows"]:
        assert row["latency_ms"] > 0 and row["images_per_s"] > 0 and 0 < row["mfu"] < 1
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] * 1e12 / 989e12)
        assert abs(row["step_ms"] * row["steps"] - row["latency_ms"]) < 1e-6 * row["latency_ms"] + 1e-9
    assert [s["batch"] for s in result["stages"]] == [1, 2]
    # the bench's prompt, 8 words and EOS, fits in 16 of T5's 32 tokens: the text bucket 4 cuts there (4, 8, 16)
    assert {s["denoiser_txt_tokens"] for s in result["stages"]} == {16}
    assert all(s["text_encoder_ms"] > 0 and s["decode_ms"] > 0 for s in result["stages"])
    # one profile per batch and variant, at the fewest steps, each summing to its own total
    profiles = result["kernel_profiles"]
    assert [(p["batch"], p["variant"], p["steps"]) for p in profiles] == [
        (b, v, 1) for b in (1, 2) for v in ("eager", "compiled")
    ]
    for p in profiles:
        assert 0 < len(p["top"]) <= 4 and p["total_ms"] > 0
        assert sum(k["share"] for k in p["kinds"]) == pytest.approx(1.0)
    eager_kinds = {k["kind"] for k in profiles[0]["kinds"]}
    assert {"gemm", "attention"} <= eager_kinds  # the denoiser's matmuls and SDPA are found by name
    table = capsys.readouterr().out
    assert "| batch | variant | steps |" in table and "text encoder ms" in table
    assert "Profile, batch 2, compiled, 1 step:" in table and "| kernel | kind | calls | ms | share |" in table
