"""bench/shapes_prompt_table.py: a row per held-out caption, every category, shares of seeds in [0, 1]."""

from __future__ import annotations

import json

from bench.shapes_prompt_table import main
from selfe.shapes.scene import CATEGORIES, evaluation_prompts


def test_the_table_has_a_row_per_prompt_and_its_shares(tmp_path, capsys):
    assert main(["--per-category", "1", "--seeds", "2", "--steps", "1", "--out", str(tmp_path / "t.json")]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    firsts = {c: next(p.caption for p in evaluation_prompts(48) if p.category == c) for c in CATEGORIES}
    assert set(table) == set(firsts.values())
    assert all(row["1"] in (0.0, 0.5, 1.0) for row in table.values())  # two seeds: 0, 1 or 2 right
    printed = capsys.readouterr().out
    assert all(f"| {caption} | {category} |" in printed for category, caption in firsts.items())


def test_captions_are_rows_once(tmp_path):
    """Single-object prompts repeat among the held-out ones (three shapes): each caption is one row, its share
    at most 1."""
    assert main(["--per-category", "4", "--seeds", "1", "--steps", "1", "--out", str(tmp_path / "t.json")]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    singles = {p.caption for p in evaluation_prompts(48) if p.category == "single_object"}
    assert singles <= set(table) and all(0.0 <= row["1"] <= 1.0 for row in table.values())
