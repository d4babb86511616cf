"""`selfe train smoke`'s export samples with a bare `selfe generate --model RUN/export`: a run on stand-in data
has no real encoders to export, so with checkpoint.export_stand_ins (on in the smoke preset) its export
carries random-init stand-ins sized to the model (selfe.train.stand_in_export)."""

from __future__ import annotations

import pytest

from selfe.cli import main
from selfe.sampling.pipeline_files import check_pipeline_dir
from selfe.train.config import DataSection, apply_overrides, preset
from selfe.train.stand_in_export import trains_on_stand_ins
from selfe.train.trainer import Trainer
from tests.helpers_text import forbid_network_and_unpickling
from tests.train.helpers_trainer import tiny_config


def test_the_smoke_preset_exports_stand_ins_for_stand_in_data_only() -> None:
    assert preset("smoke").checkpoint.export_stand_ins
    assert trains_on_stand_ins(DataSection(source="procedural"))
    assert trains_on_stand_ins(DataSection(source="synthetic"))
    assert trains_on_stand_ins(DataSection(source="cache", cache_dir="cache", encoders="smoke"))
    assert not trains_on_stand_ins(DataSection(source="cache", cache_dir="cache"))  # real encoders made it
    assert not trains_on_stand_ins(DataSection(source="images", manifest="data.tsv", encoders="pixels"))
    with pytest.raises(ValueError, match="export_stand_ins=false"):  # stand-ins or the run's own, not both
        apply_overrides(preset("smoke"), ["checkpoint.export_text_encoders=true"])


@pytest.mark.slow
def test_the_smoke_export_samples_with_a_bare_generate(tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, 1, "checkpoint.export_stand_ins=true"))
    try:
        trainer.train()
    finally:
        trainer.close()
    export = run / "export"
    meta = check_pipeline_dir(export)  # complete: model, autoencoder, both text encoders
    assert meta["autoencoder"].z_channels == trainer.config.model.in_channels
    assert meta["autoencoder"].downsample_factor == 8 and meta["resolution"] == 32
    forbid_network_and_unpickling(monkeypatch)
    out = tmp_path / "grid.png"
    argv = ["generate", "--model", str(export), "--prompt", "a red circle", "--steps", "1", "2", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    assert out.is_file() and len(list(tmp_path.glob("grid_p00_*steps.png"))) == 2
