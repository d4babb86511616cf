"""Starting a run from trained weights (`checkpoint.init_from`): continued training or fine-tuning.

The source is an export folder (what `selfe.train.export` writes: model.safetensors + config.json) or a
bare .safetensors file of the MMDiT's state dict. Only the weights come over: the optimizer, schedule,
step and data position start fresh, and a checkpoint in run_dir (resume) wins over init_from, so a
restarted fine-tune continues from its own newest checkpoint instead of starting over.

With `checkpoint.init_grow` the run's model may be deeper than the source's (more double and/or single
blocks, every other field equal). The source's blocks fill the first places of each stack and the new
blocks, appended at the end of their stack, keep the fresh adaLN-Zero init: their gates are 0, so each is
the identity and the grown model starts out computing exactly the source's function.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

from torch import nn

from selfe.components.weights import (
    StateDictMismatch,
    StateDictMismatchError,
    compare_shapes,
    expected_shapes,
    load_safetensors,
    load_safetensors_into,
    load_state_dict_into,
    safetensors_shapes,
)
from selfe.network.config import MMDiTConfig
from selfe.sampling.pipeline_files import CONFIG_FILE, MODEL_FILE, read_pipeline_config

RUN_TIME_FIELDS = ("attention_backend", "kernel_backend")  # how the model runs, not what it computes
GROWN_FIELDS = ("depth_double", "depth_single")  # what init_grow lets the run's model have more of
BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


def initial_weights_file(source: str | os.PathLike, model: MMDiTConfig, grow: bool = False) -> Path:
    """The weights file of `source`; for an export folder, its config.json's model must be `model`
    (names and shapes alone do not catch e.g. another RoPE theta or time embedding), or with `grow`
    the same but for more blocks."""
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
        skipped = RUN_TIME_FIELDS + (GROWN_FIELDS if grow else ())
        diff = {
            f.name: (getattr(exported, f.name), getattr(model, f.name))
            for f in fields(model)
            if f.compare and f.name not in skipped and getattr(exported, f.name) != getattr(model, f.name)
        }
        if diff:
            raise ValueError(
                f"checkpoint.init_from: {path} holds another model than this run's (exported, ours): {diff}"
            )
        if grow:
            shallower = {
                name: (getattr(exported, name), getattr(model, name))
                for name in GROWN_FIELDS
                if getattr(model, name) < getattr(exported, name)
            }
            if shallower:
                raise ValueError(
                    f"checkpoint.init_grow only adds blocks, but this run's model has fewer than {path} "
                    f"(exported, ours): {shallower}"
                )
    return weights


def load_initial_weights(net: nn.Module, source: str | os.PathLike, model: MMDiTConfig, grow: bool = False) -> None:
    """Copy the weights of `source` into `net` (materialised, unsharded), checked name by name first.

    grow: `net` may have more blocks than `source`; those keep their init (see the module docstring)."""
    weights = initial_weights_file(source, model, grow)
    if not grow:
        load_safetensors_into(net, weights)
        return
    found = safetensors_shapes(weights)
    mismatch = _grown_mismatch(expected_shapes(net), found)
    if not mismatch.ok:
        raise StateDictMismatchError(mismatch, os.fspath(weights))
    state = {name: tensor for name, tensor in net.state_dict().items() if name not in found}
    state.update(load_safetensors(weights))
    load_state_dict_into(net, state, source=os.fspath(weights))


def _grown_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> StateDictMismatch:
    """Every tensor of the source must be the net's, shape for shape; the net's tensors the source lacks
    must all belong to blocks past the source's last one in the same stack (so a block is never half
    loaded, and a source that lost a non-block tensor is still refused)."""
    depth = {"double_blocks": 0, "single_blocks": 0}  # the source's, from its names
    for name in found:
        if match := BLOCK_KEY.match(name):
            depth[match[1]] = max(depth[match[1]], int(match[2]) + 1)

    def new_block(name: str) -> bool:
        match = BLOCK_KEY.match(name)
        return match is not None and int(match[2]) >= depth[match[1]]

    return compare_shapes({k: v for k, v in expected.items() if k in found or not new_block(k)}, found)
