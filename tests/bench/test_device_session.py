"""bench/device_session.py: the one prepared run of every GPU check, tested on CPU.

The runner's deadline, caps, fallbacks and reports with small stand-in commands; each profile end to end
as its CPU dry run, which drives the real install-free commands (tests, benchmarks, `selfe data / train /
eval`) with the flags the device run uses, so a lease is not spent finding a typo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import device_runner as runner
from bench import device_session as session_cli
from bench.device_runner import Step


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run(steps: list[Step], tmp_path: Path, budget: float = 120.0, finish=None) -> dict:
    return runner.run_session("test", steps, tmp_path / "out", tmp_path / "work", budget, False, "cmd", finish)


def test_step_timeout_is_the_cap_cut_to_the_deadline() -> None:
    reserve, floor = runner.SUMMARY_RESERVE_S + runner.STOP_S, runner.MIN_STEP_S  # the report; a late stop
    assert runner.step_timeout(100.0, 1000.0) == 100.0
    assert runner.step_timeout(100.0, reserve + 50.0) == pytest.approx(50.0)
    assert runner.step_timeout(float("inf"), reserve + 70.0) == pytest.approx(70.0)
    assert runner.step_timeout(100.0, reserve + floor - 1.0) is None  # too short to start


def test_shapes_iterations_fit_the_time_left() -> None:
    plan = session_cli.ShapesPlan(eval_reserve_s=100.0, margin=0.5, max_steps=20_000, round_to=100)
    # 0.5 * (1100 - 100 - 0) / 0.01 = 50000 -> the cap
    assert plan.iterations(1100.0, 0.01, 0.0) == 20_000
    # 0.5 * (600 - 100 - 100) / 0.05 = 4000
    assert plan.iterations(600.0, 0.05, 100.0) == 4000
    assert plan.iterations(600.0, 0.07, 100.0) == 2800  # 2857 rounded down to 100
    assert plan.iterations(150.0, 0.05, 100.0) == 0  # no time after the evaluation
    assert plan.iterations(600.0, 0.0, 0.0) == 0


def test_runner_records_each_step_and_falls_back(tmp_path: Path) -> None:
    table = (
        "import json, sys\n"
        "print('| 1 | progress row |')\n"
        "print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')\n"
        "print('Caption of the second table:'); print(); print('| c |'); print('|---|'); print('| 3 |')\n"
        "json.dump({'x': 1}, open(sys.argv[1] + '/t.json', 'w'))\n"
    )
    rescue = Step("rescue", "9", 30, argv=python("print('rescued')"))
    steps = [
        Step("table", "1", 30, argv=[*python(table), "{work}"], json="t.json"),
        Step("bad", "2", 30, argv=python("import sys; print('boom'); sys.exit(3)"), fallback=rescue),
        Step("fn", "3", 30, run=lambda session, step, timeout: f"ran with {timeout:.0f} s"),
    ]
    results = run(steps, tmp_path)
    out = tmp_path / "out"
    got = results["steps"]
    assert got["table"]["status"] == "ok" and got["table"]["data"] == {"x": 1}
    assert got["table"]["report"] == [  # the progress row left out, the caption kept
        *("| a | b |", "|---|---|", "| 1 | 2 |", ""),
        *("Caption of the second table:", "", "| c |", "|---|", "| 3 |"),
    ]
    assert got["bad"]["status"] == "failed (exit 3)"
    assert got["bad"]["report"] == ["```", "boom", "```"]
    assert got["rescue"]["status"] == "ok" and got["fn"]["status"] == "ran with 30 s"
    assert json.loads((out / "results.json").read_text()) == results
    markdown = (out / "results.md").read_text()
    assert "| bad | 2 | failed (exit 3) |" in markdown and "| 1 | 2 |" in markdown
    assert "===== bad:" in (out / "session.log").read_text()


def test_a_step_past_its_cap_is_stopped_with_its_children(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "MIN_STEP_S", 2.5)
    monkeypatch.setattr(runner, "SUMMARY_RESERVE_S", 0.5)
    monkeypatch.setattr(runner, "KILL_GRACE_S", 1.0)
    monkeypatch.setattr(runner, "STOP_S", 0.5)
    pid_file = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    steps = [
        Step("hang", "1", 3.0, argv=python(hang)),
        Step("late", "2", 30.0, argv=python("print('never')")),
    ]
    began = time.monotonic()
    results = run(steps, tmp_path, budget=5.0)
    assert time.monotonic() - began < 30
    assert results["steps"]["hang"]["status"] == "timed out"
    assert results["steps"]["late"]["status"] == "skipped (no time left)"
    child = int(pid_file.read_text())
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "\tZ" in status.read_text()  # the grandchild went with its group


def test_a_test_run_past_its_cap_still_reports_what_ran(tmp_path: Path, monkeypatch) -> None:
    """pytest is stopped with SIGINT first: it prints its summary and writes its junit file."""
    monkeypatch.setattr(runner, "MIN_STEP_S", 1.0)
    monkeypatch.setattr(runner, "SUMMARY_RESERVE_S", 0.5)
    monkeypatch.setattr(runner, "STOP_S", 0.5)
    tests = tmp_path / "test_sample.py"
    # test_b writes a file the runner waits for (not a sleep): test_a has run and the SIGINT lands in test_b's
    # sleep, where pytest turns it into its summary
    tests.write_text(
        f"import time\ndef test_a(): pass\ndef test_b():\n    open({str(tmp_path / 'ran')!r}, 'w').close()\n"
        "    time.sleep(300)\n"
    )
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:timeout"]
    steps = [Step("tests", "1", 60.0, argv=[*pytest_argv, "--junitxml={work}/j.xml", str(tests)], junit="j.xml")]
    original_wait = runner.wait_status

    def wait_until_a_ran(proc, timeout, interrupt_first=False):
        while not (tmp_path / "ran").exists() and proc.poll() is None:
            time.sleep(0.05)  # polling for the child's own signal
        return original_wait(proc, 1.0, interrupt_first)  # then the cap is up

    monkeypatch.setattr(runner, "wait_status", wait_until_a_ran)
    got = run(steps, tmp_path, budget=120.0)["steps"]["tests"]
    assert got["status"] == "timed out"
    assert got["tests"]["tests"] >= 1 and "data_error" not in got, got


def test_a_step_takes_sigint_even_when_the_runner_was_started_with_it_ignored(tmp_path: Path) -> None:
    """`cmd &` in a script starts the runner with SIGINT ignored, which exec passes on to every step."""
    log = tmp_path / "log"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with log.open("w") as out:
            code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
            proc = runner.start(python(code), out)
            proc.wait(timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert log.read_text().split() == ["True"]


def test_stale_or_broken_step_outputs_are_not_reported(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "t.json").write_text('{"stale": 1}')  # left by an earlier call on a warm machine
    steps = [
        Step("fails", "1", 30, argv=python("import sys; sys.exit(1)"), json="t.json"),
        Step(
            "cut",
            "2",
            30,
            argv=[*python("import sys; open(sys.argv[1], 'w').write('<testsuite')"), "{work}/j.xml"],
            junit="j.xml",
        ),  # fmt: skip
        Step("after", "3", 30, argv=python("print('still runs')")),
    ]
    got = run(steps, tmp_path)["steps"]
    assert got["fails"]["status"] == "failed (exit 1)" and "data" not in got["fails"]
    assert got["cut"]["status"] == "ok" and "j.xml" in got["cut"]["data_error"]
    assert got["after"]["status"] == "ok"


def test_shapes_never_returns_an_earlier_calls_models_or_evaluation(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    stale = [work / "runs" / f"shapes-{m}" / "export" for m in session_cli.METHODS] + [work / "eval"]
    for folder in stale:  # what an earlier call on the warm machine left
        folder.mkdir(parents=True)
        (folder / "old.json").write_text("{}")
    monkeypatch.setattr(session_cli, "train_pair", lambda *a, **k: "fm failed (exit 1)")
    real = {s.name: s for s in session_cli.shapes_steps()}  # their outputs, cleared before each runs
    steps = [
        dataclasses.replace(real["shapes-pair"], cap_s=30),
        dataclasses.replace(real["shapes-eval"], cap_s=30, argv=python("import sys; sys.exit(3)"), dry_argv=None),
    ]
    got = run(steps, tmp_path, finish=session_cli.bundle_shapes)["steps"]
    assert got["shapes-pair"]["status"] == "calibration: fm failed (exit 1)"
    assert not any(folder.exists() for folder in stale)  # the evaluation step cannot score them either
    assert not list((tmp_path / "out").glob("*.tar.gz"))
    for folder in stale:  # made again after the pair (as if it had run), yet the pair failed: not returned
        folder.mkdir(parents=True)
    session_cli.bundle_shapes(runner.Session(tmp_path / "out", work, 0.0, False, None, {"steps": got}))
    assert not list((tmp_path / "out").glob("*.tar.gz"))


def test_junit_summary_counts_and_names_failures(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skipped(): pass\n"
    )
    xml = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_sample.py"],
        cwd=tmp_path,
        capture_output=True,
    )
    summary = runner.junit_summary(xml)
    assert (summary["tests"], summary["failures"], summary["errors"], summary["skipped"]) == (3, 1, 0, 1)
    (name, message), *_ = summary["failing"].items()
    assert name.endswith("::test_bad") and "one is not two" in message


def test_cli_checks_its_arguments(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        session_cli.main(["--profile", "engine", "--only", "kernels,nope", "--out", str(tmp_path)])
    assert "no step ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        session_cli.main(["--profile", "engine", "--budget", "60", "--out", str(tmp_path)])
    assert "--budget must be at least 65 s" in capsys.readouterr().err  # 15 report + 30 to stop + 20 a step
    with pytest.raises(SystemExit):
        session_cli.main(["--profile", "shapes"])
    assert "--out is required" in capsys.readouterr().err
    assert session_cli.main(["--profile", "engine", "--plan", "--only", "kernels"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in plan] == ["env", "install", "kernels"]


# A dry run of every step costs minutes of the suite; steps that run a script another profile's dry run already
# runs at tiny sizes (sample_throughput.py, train_mfu.py) are left to that one, and their device argv to the
# parse test below.
DRY_RUN_ONLY = {
    "engine": ("gpu-tests", "peers", "kernels", "model-fwd-bwd", "autoencoder", "gpu-tests-fp32-fp16", "compile-time"),
    "sampling": ("torchao", "sample-b1-e2e", "sample-b1-base", "fp8", "gpu-tests"),
}


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["engine", "sampling", "training", "shapes"])
def test_dry_run_of_each_profile_passes_every_step(profile: str, tmp_path: Path, monkeypatch) -> None:
    if profile in ("sampling", "training"):
        pytest.importorskip("torchao.float8", reason="the FP8 step's CPU run needs torchao (the device gets the wheel)")
    monkeypatch.setenv("SELFE_DEVICE_WORK", str(tmp_path / "work"))
    out = tmp_path / "out"
    argv = ["--profile", profile, "--dry-run", "--out", str(out), "--budget", "600"]
    if profile in DRY_RUN_ONLY:  # the steps whose script the other profiles' dry runs do not already run
        argv += ["--only", ",".join(DRY_RUN_ONLY[profile])]
    assert session_cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert steps["install"]["status"] == "skipped (dry run)"
    assert steps.get("torchao", {"status": "skipped (dry run)"})["status"] == "skipped (dry run)"
    assert all(s["status"] == "ok" for name, s in steps.items() if name not in ("install", "torchao")), steps
    assert steps["env"]["data"]["torch"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(os.path.getsize(out / f) < 16 * 2**20 for f in files)  # what the device returns
    if profile == "engine":
        assert steps["gpu-tests"]["tests"]["tests"] > 0
        for name in ("kernels", "model-fwd-bwd", "autoencoder", "compile-time"):
            assert steps[name]["data"], name
    elif profile == "sampling":  # in the brief's order: end to end, its baseline, FP8, then the rest
        assert list(steps)[3:6] == ["sample-b1-e2e", "sample-b1-base", "fp8"]
        for name in ("sample-b1-e2e", "sample-b1-base"):
            rows = steps[name]["data"]["rows"]
            assert rows and all(r["end_to_end_ms"] >= r["denoise_ms"] > 0 for r in rows), name
        assert steps["sample-b1-e2e"]["data"]["kernel_profiles"]
        assert steps["sample-b1-base"]["data"]["text_bucket"] is None  # the old defaults
        assert all(row["passed"] for row in steps["fp8"]["data"]["quality"])
        assert {r["batch"] for r in steps["fp8"]["data"]["speed"]} == {1, 2}
        assert steps["gpu-tests"]["tests"]["tests"] > 0
    elif profile == "training":
        assert list(steps) == ["env", "install", "torchao", "gpu-tests", "train-selective", "train-no-ac", "train-fp8",
                               "train-eager"]  # fmt: skip
        compiled = steps["train-selective"]["data"]["results"][0]
        assert compiled["variant"] == "compile+selective" and compiled["plan"].startswith("activation checkpointing")
        assert all(r["loss_finite"] for name in ("train-fp8", "train-eager") for r in steps[name]["data"]["results"])
    else:
        assert steps["shapes-pair"]["iterations"] == session_cli.DRY_SHAPES.max_steps
        assert set(steps["shapes-eval"]["data"]) == {"shapes-fm", "shapes-selfe"}  # both models scored
        for method in session_cli.METHODS:
            with tarfile.open(out / f"shapes-{method}-export.tar.gz") as tar:
                assert f"shapes-{method}-export/model.safetensors" in tar.getnames()
        with tarfile.open(out / "shapes-eval.tar.gz") as tar:
            assert "shapes-eval/shapes_eval.json" in tar.getnames()


@pytest.mark.parametrize("profile", ["engine", "sampling"])
def test_the_profiles_benchmark_commands_parse_here(profile: str) -> None:
    """The dry run drives each benchmark with tiny sizes; this parses the device run's own argv (2b, 512^2),
    so a preset/flag clash is found here, not on the device (train-mfu once lost its lease slot to one)."""
    import importlib

    from selfe.utils.optional import probe

    checked = []
    for step in session_cli.PROFILES[profile][0]():
        script = step.argv[1] if step.argv and len(step.argv) > 1 else ""
        if not script.startswith("bench/") or script == "bench/device_session.py":
            continue
        module = importlib.import_module("bench." + Path(script).stem)
        argv = [arg.replace("{work}", "/tmp") for arg in step.argv[2:]]
        try:
            module.parse_args(argv)
        except SystemExit as exit_info:  # only a refusal for want of a GPU (or of torchao, here) is expected
            no_torchao = script == "bench/fp8_sampling.py" and not probe("torchao").available
            expected = script == "bench/kernels.py" or no_torchao
            assert expected and exit_info.code == 2, f"{step.name}: {argv}"
        checked.append(step.name)
    wanted = {
        "engine": {"kernels", "sample-b1", "train-mfu", "sample-b16", "model-fwd-bwd", "autoencoder", "compile-time"},
        "sampling": {"sample-b1-e2e", "sample-b1-base", "fp8", "sample-b16-e2e", "sample-b1-variants"},
    }
    assert wanted[profile] <= set(checked)
