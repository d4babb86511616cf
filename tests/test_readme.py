"""The README is the front door: short, its commands the ones CI runs, its examples runnable, its links alive.

A fenced block whose info string is "python runnable" (GitHub highlights it by the first word, python) is
run as a script, on the CPU, in a fresh process in an empty folder, in README.md and in docs/*.md.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
RUNNABLE_INFO = "python runnable"
# An inline link or image: [text](target) or ![alt](target "title")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```+|~~~+)(.*)$")


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, body, line number of the opening fence) of every fenced code block, indented ones included."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i].lstrip())
        if opening is None:
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        fence, start, body = opening.group(1), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i].lstrip())
            i += 1
        blocks.append((opening.group(2).strip(), "\n".join(body) + "\n", start))
        i += 1
    return blocks


def outside_fences(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    kept, in_fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line.lstrip())
        if in_fence is None and opening:
            in_fence = opening.group(1)
        elif in_fence is not None and line.strip().startswith(in_fence):
            in_fence = None
        elif in_fence is None:
            kept.append(line)
    return kept


def block_after(text: str, label: str) -> str:
    """The body of the first fenced block after the line that starts with `label` (e.g. "**Test**")."""
    label_line = next((n for n, line in enumerate(text.splitlines(), 1) if line.startswith(label)), None)
    assert label_line is not None, f"README.md has no line starting with {label!r}"
    for _, body, fence_line in fenced_blocks(text):
        if fence_line > label_line:
            return body.strip()
    raise AssertionError(f"README.md has no fenced block after {label!r}")


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in outside_fences(path.read_text(encoding="utf-8")):
        if match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = github_anchor(match.group(1))
            anchor, n = base, 1
            while anchor in found:  # GitHub numbers repeated headings: x, x-1, x-2, ...
                anchor, n = f"{base}-{n}", n + 1
            found.add(anchor)
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of the page `path` whose file, or whose heading in a linked .md file, does not exist.
    Links inside code (fenced or inline) are not links."""
    prose = "\n".join(re.sub(r"`[^`]*`", "", line) for line in outside_fences(path.read_text(encoding="utf-8")))
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{path.relative_to(root)}: {target} (no heading #{fragment} in {file_part or path.name})")
    return problems


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {MAX_README_LINES})"


def test_setup_and_test_commands_are_the_ones_ci_runs():
    readme = README.read_text(encoding="utf-8")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    setup, test = block_after(readme, "**Set up**"), block_after(readme, "**Test**")
    assert setup in ci_lines, f"README's set-up {setup!r} is not a line of .ci/run"
    assert test in ci_lines, f"README's test command {test!r} is not a line of .ci/run"


def test_run_command_samples_prompts_the_shipped_model_draws_right():
    """The main job uses ShapesEval prompts the shipped model gets right: sampled as `selfe generate` samples
    them (one batch, seed 0 at every step count), the scorer passes nearly every image from 2 steps on (the
    README says all of them; one flipped image is left to another CPU's rounding)."""
    import torch

    from selfe import SelfEPipeline, shipped_model_dir
    from selfe.generate import build_parser
    from selfe.shapes import scene
    from selfe.shapes.scorer import score_image

    words = shlex.split(block_after(README.read_text(encoding="utf-8"), "**Run**"))
    assert words[:2] == ["selfe", "generate"], words
    args = build_parser().parse_args(words[2:])
    assert args.model is None, "the main job samples the shipped model"
    known = {p.caption: p for category in scene.CATEGORIES for p in scene.all_prompts(category)}
    assert args.prompt and set(args.prompt) <= set(known), f"{args.prompt} are not all ShapesEval prompts"
    pipe = SelfEPipeline.from_pretrained(shipped_model_dir())
    pipe.set_progress_bar_config(disable=True)
    wrong = []
    for steps in [n for n in args.steps if n >= 2]:
        out = pipe(args.prompt, steps=steps, generator=torch.Generator().manual_seed(args.seed), output_type="np")
        for caption, image in zip(args.prompt, out.images):
            if not score_image(known[caption], (image * 255).round().astype("uint8")):
                wrong.append(f"{caption!r} at {steps} steps")
    assert len(wrong) <= 1, wrong


def test_links_in_readme_and_docs_point_at_files_that_exist():
    problems = [problem for path in [README, *DOCS] for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_checker_sees_a_broken_link_and_a_missing_anchor(tmp_path):
    (tmp_path / "there.md").write_text("# A `code` heading, here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-code-heading-here) [gone](missing.md) [bad](there.md#nope) `[code](x.md)` [web](https://x)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: there.md#nope (no heading #nope in there.md)",
    ]


RUNNABLE = [
    pytest.param(body, id=f"{path.name}:{line}")
    for path in [README, *DOCS]
    for info, body, line in fenced_blocks(path.read_text(encoding="utf-8"))
    if info == RUNNABLE_INFO
]


def test_the_readme_has_a_runnable_example():
    assert any(param.id.startswith("README.md:") for param in RUNNABLE)


@pytest.mark.slow  # a fresh process imports torch and transformers and loads a pipeline: 5-10 s on 2 cores
@pytest.mark.parametrize("code", RUNNABLE)
def test_runnable_block_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{run.stderr[-3000:]}"
