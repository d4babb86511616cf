"""Reading a pipeline directory: config.json, the weight files and the two text-encoder snapshots.

The layout is documented in selfe.sampling.pipeline; everything is local, nothing touches a hub.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from selfe.components.autoencoder import AutoEncoderConfig
from selfe.components.pixel_autoencoder import AUTOENCODER_TYPE as SPACE_TO_DEPTH
from selfe.components.pixel_autoencoder import SpaceToDepthConfig
from selfe.components.text_encoders import CLIP_MODEL_TYPES, T5_MODEL_TYPES, snapshot_model_type
from selfe.network.config import MMDiTConfig
from selfe.sampling.sampler import SamplerConfig

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
AE_FILE = "ae.safetensors"
TEXT_DIRS = ("text_encoder", "text_encoder_2")
TEXT_KEYS = ("t5_max_length", "clip_max_length", "t5_attention_mask")
TOP_KEYS = ("model", "sampler", "autoencoder", "text", "resolution")
FLUX1 = "flux1"
AUTOENCODER_TYPES = (FLUX1, SPACE_TO_DEPTH)  # config.json "autoencoder": {"type": ...}; no type = FLUX1


def read_pipeline_config(root: Path) -> dict[str, Any]:
    """config.json -> {"model": MMDiTConfig, "sampler": SamplerConfig,
    "autoencoder": AutoEncoderConfig | SpaceToDepthConfig | None (None: FLUX.1),
    "text": dict of TextEncoders.from_snapshots keywords, "resolution": int | None}; unknown keys are errors."""
    path = required_file(root / CONFIG_FILE, "pipeline config")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if "model" not in data and "hidden_size" in data:
        data = {"model": data}  # a bare MMDiTConfig dict
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; known: {list(TOP_KEYS)}")
    if "model" not in data:
        raise ValueError(f"{path} lacks the 'model' entry (the MMDiTConfig dict)")
    sampler = dict(data.get("sampler") or {})
    sampler_fields = {f.name for f in fields(SamplerConfig)}
    if set(sampler) - sampler_fields:
        raise ValueError(f"{path}: unknown sampler keys {sorted(set(sampler) - sampler_fields)}")
    text = dict(data.get("text") or {})
    if set(text) - set(TEXT_KEYS):
        raise ValueError(f"{path}: unknown text keys {sorted(set(text) - set(TEXT_KEYS))}; known: {TEXT_KEYS}")
    resolution = data.get("resolution")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(
            f"{path}: 'resolution' must be a positive int (image side in pixels) or null, got {resolution!r}"
        )
    return {
        "model": MMDiTConfig.from_dict(data["model"]),
        "sampler": SamplerConfig(**sampler),
        "autoencoder": autoencoder_config(data.get("autoencoder"), where=str(path)),
        "text": text,
        "resolution": resolution,
    }


def autoencoder_config(entry: Any, where: str = "config.json") -> AutoEncoderConfig | SpaceToDepthConfig | None:
    """config.json's "autoencoder" entry -> its config; None / {} -> None (the caller's FLUX.1 default).

    {"type": "space_to_depth", **SpaceToDepthConfig fields} -> SpaceToDepthConfig; no "type" (or "flux1")
    -> AutoEncoderConfig from the other keys."""
    if not entry:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: 'autoencoder' must be a JSON object, got {type(entry).__name__}")
    entry = dict(entry)
    kind = entry.pop("type", FLUX1)
    if kind not in AUTOENCODER_TYPES:
        raise ValueError(f"{where}: unknown autoencoder type {kind!r}; known: {list(AUTOENCODER_TYPES)}")
    cls = SpaceToDepthConfig if kind == SPACE_TO_DEPTH else AutoEncoderConfig
    known = {f.name for f in fields(cls)}
    if set(entry) - known:
        raise ValueError(
            f"{where}: unknown keys {sorted(set(entry) - known)} for autoencoder type {kind!r}; known: {sorted(known)}"
        )
    if kind == FLUX1 and not entry:
        return None
    return cls(**entry)


# A run trained on cached latents (or on stand-in ones without checkpoint.export_stand_ins) exports the model
# alone; the ShapesEval presets copy their autoencoder and text encoders into the export.
NOT_EXPORTED = "a run trained on cached or synthetic latents exports only the model"


# What a Hugging Face Hub id looks like: owner/name, each part letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_id_note(path: Any) -> str:
    """For a missing pipeline directory given as `owner/name`: how to get a Hub repository's files here
    (nothing is downloaded at run time); "" for any other path."""
    text = os.fspath(path)
    if not _HUB_ID.fullmatch(text) or Path(text).exists():
        return ""
    return (
        f". If {text!r} is a Hugging Face Hub id: selfe loads weights from local folders only and never "
        f"downloads; on a machine with network run `huggingface-cli download {text} --local-dir DIR` (or `hf "
        "download`), copy DIR here and pass DIR (a Self-E pipeline directory: model.safetensors + config.json, "
        "the autoencoder and the text encoders)"
    )


def required_file(path: Path, what: str, hint: str = "") -> Path:
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {str(path)!r} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}{hint}")
    return path


AE_HINT = f" ({NOT_EXPORTED}: pass autoencoder_path=, t5_path=, clip_path=, or to selfe generate --ae, --t5, --clip)"


def _tokenizer_dir(encoder_dir: Path) -> Path | None:
    """The encoder folder if it holds tokenizer files, else the diffusers sibling tokenizer[_2]."""
    if any((encoder_dir / name).is_file() for name in ("tokenizer.json", "spiece.model", "vocab.json")):
        return None
    sibling = encoder_dir.parent / encoder_dir.name.replace("text_encoder", "tokenizer")
    return sibling if sibling.is_dir() else None


def text_encoder_dirs(
    root: Path, t5_path: str | Path | None, clip_path: str | Path | None
) -> tuple[Path, Path | None, Path, Path | None]:
    """(t5 dir, t5 tokenizer dir or None, clip dir, clip tokenizer dir or None)."""
    found: dict[str, Path] = {}
    for name in TEXT_DIRS if t5_path is None or clip_path is None else ():  # both given: the folders are unused
        folder = root / name
        if folder.is_dir():
            kind = snapshot_model_type(folder)
            if kind.startswith(T5_MODEL_TYPES):
                found.setdefault("t5", folder)
            elif kind.startswith(CLIP_MODEL_TYPES):
                found.setdefault("clip", folder)
    t5 = Path(t5_path) if t5_path is not None else found.get("t5")
    clip = Path(clip_path) if clip_path is not None else found.get("clip")
    for what, folder, arg in (("T5", t5, "t5_path"), ("CLIP", clip, "clip_path")):
        if folder is None:
            raise FileNotFoundError(
                f"no {what} text encoder in {str(root)!r}: expected a snapshot folder {TEXT_DIRS[0]}/ or "
                f"{TEXT_DIRS[1]}/ whose config.json has a {what.lower()} model_type ({NOT_EXPORTED}: pass "
                f"{arg}=, or --{arg.removesuffix('_path')} to selfe generate)"
            )
    return t5, _tokenizer_dir(t5), clip, _tokenizer_dir(clip)


def check_pipeline_dir(root: str | Path) -> dict[str, Any]:
    """What `SelfEPipeline.from_pretrained(root)` reads, checked without loading any weights: the folder,
    config.json (parsed, returned as `read_pipeline_config` does), the model and autoencoder files and the
    two text-encoder folders. Raises FileNotFoundError or ValueError naming what is missing or broken; for
    commands that load several models one after the other and should not fail on the second after the first."""
    given, root = root, Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"pipeline directory {str(root)!r} does not exist or is not a directory{hub_id_note(given)}"
        )
    meta = read_pipeline_config(root)
    required_file(root / MODEL_FILE, "model weights")
    if not isinstance(meta["autoencoder"], SpaceToDepthConfig):  # the weightless one has no file
        required_file(root / AE_FILE, "autoencoder weights", AE_HINT)
    text_encoder_dirs(root, None, None)
    return meta
