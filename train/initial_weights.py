"""Starting a run from trained weights (`checkpoint.init_from`): continued training or fine-tuning.

The source is an export folder (what `selfe.train.export` writes: model.safetensors + config.json) or a
bare .safetensors file of the MMDiT's state dict. Only the weights come over: the optimizer, schedule,
step and data position start fresh, and a checkpoint in run_dir (resume) wins over init_from, so a
restarted fine-tune continues from its own newest checkpoint instead of starting over.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from torch import nn

from selfe.config import MMDiTConfig
from selfe.pipeline_files import CONFIG_FILE, MODEL_FILE, read_pipeline_config
from selfe.weights import load_safetensors_into

RUN_TIME_FIELDS = ("attention_backend", "kernel_backend")  # how the model runs, not what it computes


def initial_weights_file(source: str | os.PathLike, model: MMDiTConfig) -> Path:
    """The weights file of `source`; for an export folder, its config.json's model must be `model`
    (names and shapes alone do not catch e.g. another RoPE theta or time embedding)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint.init_from: {path} does not exist")
    if not path.is_dir():
        return path
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint.init_from: {path} is a folder without {MODEL_FILE}")
    if (path / CONFIG_FILE).is_file():
        exported = read_pipeline_config(path)["model"]
        diff = {
            f.name: (getattr(exported, f.name), getattr(model, f.name))
            for f in fields(model)
            if f.compare and f.name not in RUN_TIME_FIELDS and getattr(exported, f.name) != getattr(model, f.name)
        }
        if diff:
            raise ValueError(
                f"checkpoint.init_from: {path} holds another model than this run's (exported, ours): {diff}"
            )
    return weights


def load_initial_weights(net: nn.Module, source: str | os.PathLike, model: MMDiTConfig) -> None:
    """Copy the weights of `source` into `net` (materialised, unsharded), checked name by name first."""
    load_safetensors_into(net, initial_weights_file(source, model))
