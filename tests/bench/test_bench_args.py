"""The bench scripts refuse bad arguments with one argparse line and exit 2, before any model is built.

Each case is a bad value that used to pass the parser and fail later (a traceback mid-run, a statistics
error after the timing, a JSON that could not be written after the whole measurement) or be silently
replaced by a default. Only the parsers run here, plus one tiny autoencoder run: seconds in all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench import autoencoder, fp8, kernels, model_fwd_bwd, sample_throughput, train_mfu
from bench import device_session as session_cli

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")


def usage_error(parse: Callable[[list[str]], object], argv: list[str], capsys) -> str:
    """The error line of `parse(argv)`, which must exit 2 through argparse (usage, then one line)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("")
    return path


def fill(argv: list[str], a_file: Path) -> list[str]:
    return [a.replace("{file}", str(a_file)) for a in argv]


AUTOENCODER = ["--config", "tiny", "--resolution", "64", "--batch", "2", "--iters", "1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolution", "63"], "must be divisible by the downsample factor 2"),
        (["--json", "{file}/ae.json"], "is a file, not a folder"),
    ],
)
def test_autoencoder_refuses(argv: list[str], message: str, a_file: Path, capsys) -> None:
    line = usage_error(autoencoder.parse_args, [*AUTOENCODER, *fill(argv, a_file)], capsys)
    assert message in line


@NO_CUDA
def test_autoencoder_refuses_cuda_without_cuda(capsys) -> None:
    assert "no CUDA device" in usage_error(autoencoder.parse_args, [*AUTOENCODER, "--device", "cuda"], capsys)


def test_autoencoder_writes_its_json_whole_into_a_new_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "ae.json"
    autoencoder.main([*AUTOENCODER, "--warmup", "0", "--json", str(out)])
    assert json.loads(out.read_text())["bench"] == "autoencoder"
    assert sorted(p.name for p in out.parent.iterdir()) == ["ae.json"]  # no temp file left
    captured = capsys.readouterr()
    assert "encode:" in captured.out and "# decode: 0 warm-up + 1 timed batches" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--txt-tokens", "0"], "--txt-tokens must be >= 1"),  # used to mean the default
        (["--resolution", "63"], "must be a multiple of 16"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--device", "bogus"], "is not a torch device"),
        (["--json", "{file}/fp8.json"], "is a file, not a folder"),
    ],
)
def test_fp8_refuses(argv: list[str], message: str, a_file: Path, capsys) -> None:
    assert message in usage_error(fp8.parse_args, fill(argv, a_file), capsys)


@NO_CUDA
def test_fp8_refuses_cuda_without_cuda(capsys) -> None:
    assert "has no CUDA device" in usage_error(fp8.parse_args, ["--device", "cuda"], capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--buffers", "0"], "--buffers must be >= 1"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--head-dim", "0"], "--head-dim must be >= 1"),
        (["--latent", "4", "0", "6"], "--latent sizes must be >= 1"),
        (["--pad-fraction", "nan"], "--pad-fraction must be in [0, 1)"),
        (["--pad-fraction", "1"], "--pad-fraction must be in [0, 1)"),
        (["--json", "{file}/k.json"], "is a file, not a folder"),
    ],
)
def test_kernels_refuses(argv: list[str], message: str, a_file: Path, capsys) -> None:
    assert message in usage_error(kernels.parse_args, ["--cpu-smoke", *fill(argv, a_file)], capsys)


@NO_CUDA
def test_kernels_without_cuda_says_so_and_fails(capsys) -> None:
    line = usage_error(kernels.main, [], capsys)  # it used to exit 0, as if it had measured something
    assert "needs a CUDA device" in line and "--cpu-smoke" in line


def test_kernels_only_matching_nothing_is_an_error(capsys) -> None:
    line = usage_error(kernels.main, ["--cpu-smoke", "--no-attention", "--only", "nope"], capsys)
    assert "--only 'nope' matches no op" in line and "energy_preserving_mix.fwd" in line


MODEL = ["--preset", "tiny", "--resolution", "64", "--txt-tokens", "16", "--batch", "2", "--iters", "1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iters", "0"], "--iters must be >= 1"),  # a division by zero after the warm-up
        (["--batch", "0"], "--batch must be >= 1"),
        (["--txt-tokens", "0"], "--txt-tokens must be >= 1"),
        (["--resolution", "60"], "must be a multiple of 16"),
        (["--pad-fraction", "nan"], "--pad-fraction must be in [0, 1)"),  # used to mean no mask
        (["--pad-fraction", "1.5"], "--pad-fraction must be in [0, 1)"),
        (["--peak-flops", "0"], "--peak-flops must be a finite number > 0"),  # used to mean the default
        (["--peak-flops", "nan"], "--peak-flops must be a finite number > 0"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--attention-backend", "nope"], "attention_backend must be one of"),
        (["--device", "bogus"], "is not a torch device"),
        (["--json", "{file}/m.json"], "is a file, not a folder"),
    ],
)
def test_model_fwd_bwd_refuses(argv: list[str], message: str, a_file: Path, capsys) -> None:
    assert message in usage_error(model_fwd_bwd.parse_args, [*MODEL, *fill(argv, a_file)], capsys)


SAMPLE = ["--preset", "tiny", "--resolution", "64", "--batch", "1", "--steps", "1", "--variants", "eager"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "1", "0"], "--batch values must be >= 1"),
        (["--steps", "0"], "--steps values must be >= 1"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--txt-tokens", "0"], "--txt-tokens must be >= 1"),
        (["--text-bucket", "0"], "--text-bucket: must be an integer >= 1 or 'none', got '0'"),
        (["--profile-kernels", "-1"], "--profile-kernels must be >= 0"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
        (["--peak-flops", "-1"], "--peak-flops must be a finite number > 0"),
        (["--resolution", "62"], "--resolution must be a multiple of 4"),
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--t5", "{file}"], "--t5 and --clip go together"),  # one alone used to be ignored
        (["--t5", "{file}", "--clip", "{file}"], "not a directory"),
        (["--device", "bogus"], "is not a torch device"),
        (["--json", "{file}/s.json"], "is a file, not a folder"),
        (["--markdown", "{file}/s.md"], "is a file, not a folder"),
    ],
)
def test_sample_throughput_refuses(argv: list[str], message: str, a_file: Path, capsys) -> None:
    assert message in usage_error(sample_throughput.parse_args, [*SAMPLE, *fill(argv, a_file)], capsys)


TRAIN = ["--preset", "tiny", "--resolution", "64", "--steps", "1", "--variants", "eager"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),  # a statistics error after the warm-up step
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--batch", "0"], "--batch must be >= 1"),  # used to mean the default
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--variants", ","], "--variants: unknown none given"),  # used to run nothing and exit 0
        (["--peak-flops", "nan"], "--peak-flops must be a finite number > 0"),
        (["--resolution", "60"], "data.resolution must be a multiple of 16"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["--json", "{file}/t.json"], "is a file, not a folder"),
    ],
)
def test_train_mfu_refuses(argv: list[str], message: str, a_file: Path, capsys) -> None:
    assert message in usage_error(train_mfu.parse_args, [*TRAIN, *fill(argv, a_file)], capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "{file}/out"], "is a file, not a folder"),  # a traceback from mkdir
        (["--out", "{file}"], "is a file, not a folder"),
        (["--budget", "inf"], "--budget must be a finite number"),
    ],
)
def test_device_session_refuses(argv: list[str], message: str, a_file: Path, tmp_path: Path, capsys) -> None:
    argv = ["--profile", "engine", "--out", str(tmp_path / "out"), *fill(argv, a_file)]
    assert message in usage_error(session_cli.main, argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(session_cli.nvidia_gpu_present(), reason="checks the no-GPU refusal")
def test_device_session_without_a_gpu_needs_dry_run(tmp_path: Path, capsys) -> None:
    # It used to install the package into this Python and run the 2b checks on the CPU for minutes.
    line = usage_error(session_cli.main, ["--profile", "engine", "--out", str(tmp_path / "out")], capsys)
    assert "needs an NVIDIA GPU" in line and "--dry-run" in line
    assert not (tmp_path / "out").exists()


def test_device_runner_is_not_a_command() -> None:
    run = subprocess.run([sys.executable, "bench/device_runner.py"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "run bench/device_session.py" in run.stderr  # it used to exit 0 silently
    run = subprocess.run([sys.executable, "bench/device_runner.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "steps with time caps" in run.stdout
