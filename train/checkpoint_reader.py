"""Reading a checkpoint without running anything it holds, and naming the file when it is damaged.

torch.distributed.checkpoint (DCP, torch 2.11-2.13) writes `.metadata` with pickle.dump and the non-tensor
entries of `__*_*.distcp` (step, counters, the scheduler's and the optimizer's settings) with torch.save,
and its stock reader unpickles both without restriction (plain pickle, and torch's loader with its weights-only
guard off): a pickle planted in either would run on load. We keep DCP's file format (FSDP2's DTensor shards
and the optimizer state resume as DCP reshards them) and read it through two subclasses of DCP's own reader and planner:
    .metadata             an unpickler that admits only DCP's metadata classes (the dataclasses and enums
                          of torch.distributed.checkpoint.metadata / .filesystem), torch.Size, dtypes,
                          layouts and paths; any other global (os.system, exec, ...) is refused unlooked-up
    non-tensor entries    torch.load(weights_only=True): plain Python values only
    tensor entries        DCP itself reads them with torch.load(weights_only=True)
DCP's Hugging Face (safetensors) storage was the alternative; its reader builds the metadata from the
tensors' headers alone, so the step and the optimizer's settings would need a second format beside it.
Every checkpoint written so far (DCP's plain writer) loads as before: the format is unchanged.

Every failure to read a file is a DamagedCheckpointError naming that file; the trainer then falls back
to the previous checkpoint (selfe.train.checkpoint.Checkpointer.load_newest).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

METADATA_NAME = ".metadata"
DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
# What else DCP's metadata pickles: tensor sizes, dtypes (torch.float32 ...), layouts (by name, through
# torch.serialization's lookup table), and the checkpoint_id a writer was given as a path.
OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class DamagedCheckpointError(ValueError):
    """A file of a checkpoint cannot be read (truncated, garbled, or holding what we refuse to unpickle)."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{path} is damaged ({why})")
        self.path, self.why = Path(path), why

    def __reduce__(self):  # DCP gathers each rank's error to every rank by pickling it
        return type(self), (self.path, self.why)


def describe(err: BaseException) -> str:
    """'Type: message' on one line, or the type alone (EOFError has no message)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler for DCP's `.metadata`: globals from the allow-list above only."""

    def find_class(self, module: str, name: str) -> Any:
        if module in DCP_MODULES:  # vars(), not getattr: no module-level __getattr__ runs
            value = vars(importlib.import_module(module)).get(name)
            if isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                return value
        elif module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        elif (module, name) in OTHER_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: not part of DCP's metadata")


def read_metadata_file(path: str | Path) -> Metadata:
    """DCP's metadata from `path`, or a DamagedCheckpointError naming it."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except Exception as err:  # OSError, or what a garbled pickle raises (EOFError, UnpicklingError, ...)
        raise DamagedCheckpointError(path, describe(err)) from None
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpointError(path, f"holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler; a file that fails to read is named."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # torch 2.13 asks for a rank's own metadata when the global one is missing
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        metadata = read_metadata_file(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # One file at a time, so that a truncated or garbled one is named.
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for relative_path, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as err:
                raise DamagedCheckpointError(Path(self.path) / relative_path, describe(err)) from None
        done: Future[None] = Future()
        done.set_result(None)
        return done


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but the non-tensor entries load with torch.load(weights_only=True)
    (DefaultLoadPlanner.load_bytes with that one argument changed)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_dcp(path: str | Path, state: dict[str, Any], *, no_dist: bool = False) -> None:
    """dcp.load of `path` into `state` in place, reading nothing that can run code. A file that cannot be
    read is a DamagedCheckpointError naming it; a checkpoint that does not fit `state` (missing keys, other
    shapes) stays a CheckpointException."""
    path = Path(path)
    reader = SafeFileSystemReader(path)
    read_metadata_file(path / METADATA_NAME)  # first: else DCP logs two tracebacks before its own error
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as err:  # a BaseException wrapping each rank's error
        damaged = [f[0] for f in err.failures.values() if isinstance(f[0], DamagedCheckpointError)]
        if damaged:
            raise damaged[0] from None
        raise


def first_failure(err: CheckpointException) -> str:
    """The first rank's error of a CheckpointException, on one line."""
    cause = next((failure[0] for failure in err.failures.values()), None)
    return describe(cause) if cause is not None else describe(err)


def read_json_file(path: str | Path) -> Any:
    """A JSON file of a checkpoint, or a DamagedCheckpointError naming it (FileNotFoundError if absent)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedCheckpointError(path, describe(err)) from None


def read_rank_file(path: str | Path) -> dict[str, Any]:
    """A rank's plain objects (RNG states, data position), loaded with weights_only=True."""
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DamagedCheckpointError(path, "missing") from None
    except Exception as err:
        raise DamagedCheckpointError(path, describe(err)) from None
    if not isinstance(state, dict):
        raise DamagedCheckpointError(path, f"holds a {type(state).__name__}, not a dict")
    return state
