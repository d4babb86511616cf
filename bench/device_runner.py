"""The machinery of bench/device_session.py: steps with time caps under one deadline, and their report.

Standard library only (it runs before the package is installed). A step is a command (or a function)
with a cap; the session gives it the cap or what is left of the budget, whichever is less, and skips
it when that is too short to be worth starting. A command that runs out of time gets SIGTERM (a test
run SIGINT first), then SIGKILL, with its whole process group. Every step's output goes to
OUT/session.log; OUT/results.json is rewritten after every step (so a run killed from outside still
returns what it did) and OUT/results.md is the section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
SUMMARY_RESERVE_S = 15.0  # kept back from the budget for the report and the bundles
MIN_STEP_S = 20.0  # a step that would get less than this is skipped rather than started
KILL_GRACE_S = 10.0  # after SIGINT (pytest then writes its report) and after SIGTERM (the trainer checkpoints)
STOP_S = 30.0  # the longest a step takes to stop once its time is up (the ShapesEval pair: 2 x (10 + 5) s)


@dataclasses.dataclass
class Session:
    """Where a run writes, its deadline, and whether it is the CPU dry run."""

    out: Path  # what comes back from the device
    work: Path  # scratch space for everything else
    deadline: float  # time.monotonic() by which every step has ended
    dry_run: bool
    log: IO[str]  # OUT/session.log, open for appending
    results: dict

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, **fields) -> None:
        self.results["steps"].setdefault(name, {}).update(fields)
        write_atomic(self.out / "results.json", json.dumps(self.results, indent=1, default=str))


@dataclasses.dataclass
class Step:
    """A command (argv, placeholders {py} and {work}) or a function run(session, step, timeout) -> status.
    cap_s: the most it may take; json: a file it writes under {work}, merged into results.json."""

    name: str
    issue: str
    cap_s: float
    argv: list[str] | None = None
    dry_argv: list[str] | None = None  # the CPU dry run's arguments; None: the same as argv
    run: Callable[[Session, Step, float], str] | None = None
    json: str | None = None
    junit: str | None = None  # a pytest --junitxml file it writes under {work}, summarised; set for pytest
    # steps, which are stopped with SIGINT first: pytest then still prints its summary and writes the file
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # files or folders under {work} it makes (besides json, junit): cleared first
    fallback: Step | None = None  # run when this step fails (e.g. the pure-Python install)
    dry_skip: bool = False  # nothing to check on CPU (the install: the dry run uses the installed package)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# The shortest budget in which a step can start (step_timeout).
MIN_BUDGET_S = SUMMARY_RESERVE_S + STOP_S + MIN_STEP_S


def step_timeout(cap_s: float, left_s: float) -> float | None:
    """Seconds a step may run: its cap, cut to what is left after the report's reserve and the time a
    step over its limit takes to stop; None when that is too short to be worth starting."""
    usable = min(cap_s, left_s - SUMMARY_RESERVE_S - STOP_S)
    return usable if usable >= MIN_STEP_S else None


def start(argv: list[str], log: IO[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """argv in the repo root, output to log, in its own process group (a timeout ends its children too)."""
    return subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
        preexec_fn=_take_interrupts,
    )


def _take_interrupts() -> None:
    """In the child before exec: SIGINT back to its default. A job a non-interactive shell started in the
    background inherits SIGINT ignored, and Python then never raises KeyboardInterrupt, so a test run past
    its cap would die at SIGTERM without its summary or junit file."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(proc: subprocess.Popen, interrupt_first: bool = False) -> None:
    """SIGTERM the process group (SIGINT first when `interrupt_first`), then SIGKILL what is left, a grace
    period after each."""
    signals = [(signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)]
    if interrupt_first:
        signals.insert(0, (signal.SIGINT, KILL_GRACE_S))
    for sig, wait in signals:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_status(proc: subprocess.Popen, timeout: float, interrupt_first: bool = False) -> str:
    """'ok', 'failed (exit N)' or, past the timeout (the group then stopped), 'timed out'."""
    try:
        code = proc.wait(timeout=max(0.1, timeout))
    except subprocess.TimeoutExpired:
        stop_group(proc, interrupt_first)
        return "timed out"
    return "ok" if code == 0 else f"failed (exit {code})"


def run_command(session: Session, step: Step, timeout: float) -> str:
    argv = step.dry_argv if session.dry_run and step.dry_argv is not None else step.argv
    argv = [a.replace("{py}", sys.executable).replace("{work}", str(session.work)) for a in argv]
    session.log.write(f"\n===== {step.name}: {' '.join(argv)}\n")
    session.log.flush()
    return wait_status(start(argv, session.log, step.env), timeout, interrupt_first=step.junit is not None)


def run_step(session: Session, step: Step) -> str:
    """Run one step within its cap and the deadline; record its status, time, JSON and report."""
    timeout = step_timeout(step.cap_s, session.left)
    if session.dry_run and step.dry_skip:
        status = "skipped (dry run)"
    elif timeout is None:
        status = "skipped (no time left)"
    else:
        print(f"[{step.name}] running (up to {timeout:.0f} s)", flush=True)  # progress: a step can take minutes
        for name in (step.json, step.junit, *step.outputs):  # a warm machine's earlier call left them: not this run's
            if name:
                path = session.work / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        began, offset = time.monotonic(), session.log.tell()
        status = step.run(session, step, timeout) if step.run else run_command(session, step, timeout)
        session.log.flush()
        session.record(step.name, seconds=round(time.monotonic() - began, 1))
        with open(session.log.name, errors="replace") as f:  # a step may print any bytes
            f.seek(offset)
            report = step_report(f.read())
        if report:
            session.record(step.name, report=report)
        merge_outputs(session, step)
    session.record(step.name, issue=step.issue, status=status)
    print(f"[{step.name}] {status} ({session.left:.0f} s left)", flush=True)
    if not status.startswith(("ok", "skipped")) and step.fallback is not None:
        run_step(session, step.fallback)
    return status


def merge_outputs(session: Session, step: Step) -> None:
    if step.json and (session.work / step.json).is_file():
        try:
            session.record(step.name, data=json.loads((session.work / step.json).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            session.record(step.name, data_error=f"{step.json}: {err}")
    if step.junit and (session.work / step.junit).is_file():
        try:
            session.record(step.name, tests=junit_summary(session.work / step.junit))
        except ET.ParseError as err:  # pytest killed while writing it
            session.record(step.name, data_error=f"{step.junit}: {err}")


def junit_summary(path: Path) -> dict:
    """Counts and the failing tests (name: first line of the message) of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = {}
    for case in root.iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failing[f"{case.get('classname')}::{case.get('name')}"] = message[0][:300] if message else ""
    return {**counts, "failing": failing}


NOISE = re.compile(r"^([WIE]\d{4} |Failed to load |=====|\s*$)|it/s\]|img/s\]")  # torch warnings, progress bars


def step_report(text: str, max_lines: int = 12) -> list[str]:
    """What a step printed worth keeping: its markdown tables (a header row, a |---| row, then rows; rows
    printed as progress before a table are left out), each with its caption (the text line just above it,
    blank lines between allowed), or, with no table, its last lines that are not noise."""
    lines, tables, k = text.splitlines(), [], 0
    while k < len(lines) - 1:
        if lines[k].startswith("|") and lines[k + 1].startswith("|---"):
            end = k + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            above = k - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            caption = lines[above] if above >= 0 else ""
            has_caption = bool(caption) and not caption.startswith(("|", "```")) and not NOISE.search(caption)
            tables += [""] * bool(tables) + [caption, ""] * has_caption + lines[k:end]
            k = end
        else:
            k += 1
    if tables:
        return tables
    kept = [line for line in lines if not NOISE.search(line)]
    return ["```", *kept[-max_lines:], "```"] if kept else []


def results_markdown(results: dict) -> str:
    """The section for bench/RESULTS.md: device, date, commit, command, each step's status and report."""
    env = results["steps"].get("env", {}).get("data", {})
    lines = [
        f"### Device session `{results['profile']}`, {results['date']}",
        "",
        f"Device: {env.get('device', '?')} ({env.get('nvidia_smi', '')}), torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}, Triton {env.get('triton', '?')}, "
        f"Python {env.get('python', '?')}; SDPA order {', '.join(env.get('sdpa_order', [])) or '?'}. "
        f"Commit {results['commit']}. Command: `{results['command']}`"
        + (" (CPU dry run: the numbers mean nothing)" if results["dry_run"] else "")
        + ".",
        "",
        "| step | issue | status | seconds |",
        "|---|---|---|---|",
    ]
    for name, step in results["steps"].items():
        lines.append(f"| {name} | {step.get('issue', '')} | {step.get('status', '')} | {step.get('seconds', '')} |")
    for name, step in results["steps"].items():
        extra = list(step.get("summary", []))
        if "tests" in step:
            t = step["tests"]
            extra.append(f"{t['tests']} tests, {t['failures']} failures, {t['errors']} errors, {t['skipped']} skipped")
            extra += [f"- FAILED `{k}`: {v}" for k, v in t["failing"].items()]
        if step.get("report"):
            extra += [""] * bool(extra) + step["report"]
        if extra:
            lines += ["", f"**{name}**", "", *extra]
    return "\n".join(lines) + "\n"


def commit() -> str:
    """The short commit of the tree, or SELFE_COMMIT where the tree travelled without .git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return os.environ.get("SELFE_COMMIT", "unknown")


def run_session(
    profile: str,
    steps: list[Step],
    out: Path,
    work: Path,
    budget_s: float,
    dry_run: bool,
    command: str,
    finish: Callable[[Session], None] | None = None,
) -> dict:
    """Run the steps in order under one deadline; finish(session) (bundling files into OUT) runs last,
    inside the reserve; returns results.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "profile": profile,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "command": command,
        "dry_run": dry_run,
        "budget_s": budget_s,
        "steps": {},
    }
    with open(out / "session.log", "a") as log:
        session = Session(out, work, time.monotonic() + budget_s, dry_run, log, results)
        for step in steps:
            run_step(session, step)
        if finish is not None:
            finish(session)
    write_atomic(out / "results.md", results_markdown(results))
    return results


if __name__ == "__main__":  # a library, not a command: say so rather than exit silently
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    parser.error("no command line of its own: run bench/device_session.py (--help)")
