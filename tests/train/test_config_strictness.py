"""A config is taken as written or refused: a config.json missing a whole section, or a command line
giving a key twice, is an error naming it, never silently the defaults or the last value."""

from __future__ import annotations

import json

import pytest

from selfe.train.cli import train_main
from selfe.train.config import OptimConfig, apply_overrides, load_config, preset, resolve, save_config


def test_a_config_json_missing_a_section_is_refused_naming_it(tmp_path):
    path = tmp_path / "config.json"
    save_config(preset("smoke"), path)
    assert load_config(path) == preset("smoke")  # a saved config has every section
    for dropped, name in [(("fp8",), "fp8"), (("objective", "time_shift"), "objective.time_shift")]:
        data = preset("smoke").to_dict()
        section = data
        for key in dropped[:-1]:
            section = section[key]
        del section[dropped[-1]]
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=f"{path}: config section {name} missing"):
            load_config(path)
    data = preset("smoke").to_dict()
    del data["optim"]["lr"]  # a field, not a section: its default, as before
    path.write_text(json.dumps(data))
    assert load_config(path).optim.lr == OptimConfig().lr


def test_a_key_given_twice_on_the_command_line_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(
        ValueError, match=r"config key 'optim.lr' is given twice \('optim.lr=1e-3', then ' optim.lr=2e-3'\)"
    ):
        resolve("smoke", ["optim.lr=1e-3", "steps=3", " optim.lr=2e-3"])
    assert train_main(["smoke", "--print-config", "steps=3", "steps=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'steps' is given twice" in err
    # layered in code, a later override still replaces an earlier one
    assert apply_overrides(preset("smoke"), ["steps=3", "steps=4"]).steps == 4
    assert resolve("smoke", ["steps=3", "optim.lr=1e-3"]).steps == 3
