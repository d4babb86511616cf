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


@pytest.mark.slow  # a compile per batch and variant
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
    # the bench's prompt, 8 words and EOS, fits in 16 of T5's 32 tokens: the text bucket 4 cuts there (4, 8, 16);
    # with CFG the null prompt's rows (EOS alone) follow the prompts'
    flops = {f["batch"]: f for f in result["flops"]}
    assert [(f["txt_lengths"], f["denoiser_txt_tokens"]) for f in flops.values()] == [
        ([9, 1], 16),
        ([9, 9, 1, 1], 16),
    ]
    for row in result["rows"]:
        f = flops[row["batch"]]
        assert row["useful_flops_per_step"] == f["useful_flops_per_step"] < row["executed_flops_per_step"]
        assert 0 < row["mfu"] < row["executed_mfu"] < 1
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] * 1e12 / 989e12)
        assert abs(row["step_ms"] * row["steps"] - row["latency_ms"]) < 1e-6 * row["latency_ms"] + 1e-9
        stages = [row[f"{stage}_ms"] for stage in ("tokenize", "t5", "clip", "denoise", "decode")]
        assert all(ms > 0 for ms in stages) and row["latency_ms"] == row["denoise_ms"]
        assert row["tokenize_ms"] + row["t5_ms"] + row["clip_ms"] == pytest.approx(row["text_encoder_ms"])
        assert sum(stages) <= row["end_to_end_ms"]  # the stages of one call, inside its end to end
        assert row["e2e_images_per_s"] == pytest.approx(row["batch"] / row["end_to_end_ms"] * 1e3)
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
    assert "| batch | variant | steps | end to end ms | tokenize | T5 | CLIP | denoise | decode |" in table
    assert "FLOPs per denoiser step, batch 1: " in table and "executed TFLOP" in table
    assert "Profile, batch 2, compiled, 1 step, end to end:" in table and "| kernel | kind | calls | ms |" in table
