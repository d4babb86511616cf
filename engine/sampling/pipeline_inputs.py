"""Checks of what the pipeline is given, before any work: `from_pretrained`'s arguments, config.json's
entries, the weight files and text-encoder folders (headers and config.json only, no weights read), and
a call's prompts and sizes. Each error names the argument, key or file."""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from selfe.components.autoencoder import AutoEncoderConfig
from selfe.components.autoencoder import config_from_file as autoencoder_config_from_file
from selfe.components.autoencoder import flux1 as flux1_autoencoder
from selfe.components.pixel_autoencoder import SpaceToDepthConfig
from selfe.components.text_encoders import (
    CLIP_MODEL_TYPES,
    CLIP_TOKENIZER_FILES,
    DTYPE_NAMES,
    T5_MODEL_TYPES,
    T5_TOKENIZER_FILES,
    check_model_dir,
    check_tokenizer_dir,
    resolve_device,
    resolve_dtype,
)
from selfe.components.vocabulary import closed_vocabulary, unknown_words
from selfe.network.config import MMDiTConfig
from selfe.sampling.fast_path import FastPathConfig
from selfe.sampling.pipeline_files import AE_FILE, AE_HINT, CONFIG_FILE, MODEL_FILE, hub_id_note, required_file
from selfe.utils.devices import unavailable_reason


def checked_root(path: Any) -> Path:
    """`from_pretrained`'s path as an existing directory, or an error naming `path`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a pipeline directory (str or os.PathLike), got {type(path).__name__}")
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"path {str(root)!r} is a file, not a pipeline directory; pass the folder holding {MODEL_FILE} + "
            f"{CONFIG_FILE}"
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"pipeline directory {str(root)!r} does not exist; expected {MODEL_FILE} + {CONFIG_FILE} "
            f"(as the trainer exports them) and the autoencoder and text encoders{hub_id_note(path)}"
        )
    return root


def checked_device(device: Any) -> torch.device:
    """`device=` as a torch.device that exists on this machine, or a ValueError naming `device`."""
    if device is None:
        return resolve_device(None)
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a str, an int or a torch.device, got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a device here ({err}); pass e.g. 'cpu' or 'cuda'") from err
    if (reason := unavailable_reason(parsed)) is not None:
        raise ValueError(f"device={device!r}: {reason} (torch {torch.__version__})")
    return parsed


def checked_dtype(name: str, value: Any, device: torch.device) -> torch.dtype:
    """`torch_dtype=` / `text_encoder_dtype=` as a torch.dtype, or a ValueError naming the argument."""
    try:
        return resolve_dtype(value, device)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must be torch.bfloat16, torch.float16, torch.float32, one of the names "
            f"{tuple(DTYPE_NAMES)} or None, got {value!r}"
        ) from err


def autoencoder_source(
    root: Path, config: Any, autoencoder_path: str | Path | None
) -> tuple[AutoEncoderConfig | SpaceToDepthConfig, Path | None]:
    """The pipeline's autoencoder config and weight file (None for the weightless one), checked, nothing loaded.

    No "autoencoder" entry in config.json: the config in ae.safetensors' metadata, else FLUX.1."""
    if isinstance(config, SpaceToDepthConfig):
        if autoencoder_path is not None:
            raise ValueError(
                f"autoencoder_path={str(autoencoder_path)!r} given, but the pipeline's autoencoder is "
                "'space_to_depth', which has no weights"
            )
        return config, None
    ae_file = Path(autoencoder_path).expanduser() if autoencoder_path is not None else root / AE_FILE
    ae_file = required_file(ae_file, "autoencoder weights", AE_HINT if autoencoder_path is None else "")
    if config is None:
        config = autoencoder_config_from_file(ae_file) or flux1_autoencoder()
    return config, ae_file


def checked_text_options(text: dict[str, Any], where: str) -> dict[str, Any]:
    """config.json's "text" entry: t5_max_length an int >= 1, clip_max_length an int >= 2, t5_attention_mask a bool."""
    for key, minimum in (("t5_max_length", 1), ("clip_max_length", 2)):
        value = text.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{where}: text.{key} must be an integer >= {minimum}, got {value!r}")
    mask = text.get("t5_attention_mask")
    if mask is not None and not isinstance(mask, bool):
        raise ValueError(f"{where}: text.t5_attention_mask must be true or false, got {mask!r}")
    return {k: v for k, v in text.items() if v is not None}


def check_text_snapshots(
    t5_dir: Path,
    t5_tok: Path | None,
    clip_dir: Path,
    clip_tok: Path | None,
    config: MMDiTConfig,
    clip_max_length: int,
) -> None:
    """The T5 / CLIP folders hold config.json, safetensors weights and tokenizer files, their widths (where
    config.json says them) match the model's txt_dim / vec_dim, and CLIP has clip_max_length positions:
    checked before anything loads."""
    check_model_dir(t5_dir, "T5 encoder", T5_MODEL_TYPES)
    check_tokenizer_dir(t5_tok or t5_dir, "T5", T5_TOKENIZER_FILES)
    check_model_dir(clip_dir, "CLIP text encoder", CLIP_MODEL_TYPES)
    check_tokenizer_dir(clip_tok or clip_dir, "CLIP", CLIP_TOKENIZER_FILES)
    t5 = _snapshot_config(t5_dir)
    clip = _snapshot_config(clip_dir)
    clip = clip.get("text_config", clip) if clip.get("model_type") == "clip" else clip
    for what, width, expected, key in (
        ("T5", t5.get("d_model"), config.txt_dim, "txt_dim"),
        ("CLIP", clip.get("hidden_size"), config.vec_dim, "vec_dim"),
    ):
        if isinstance(width, int) and not isinstance(width, bool) and width != expected:
            raise ValueError(f"the {what} encoder's width is {width}, the model expects {key}={expected}")
    positions = clip.get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and clip_max_length > positions:
        raise ValueError(
            f"text.clip_max_length={clip_max_length}, but the CLIP encoder in {str(clip_dir)!r} has "
            f"{positions} positions"
        )


def _snapshot_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # check_model_dir has named a missing or broken file already
    return data if isinstance(data, dict) else {}


def warn_truncated(text_encoders: Any, prompts: list[str], name: str = "prompt") -> None:
    """A UserWarning naming the prompts the text encoders will truncate (T5 / CLIP max_length tokens).

    Tokenizes to max_length + 1 only: enough to tell, and no tokenizer warning about long inputs."""
    notes = []
    for attr, label in (("t5", "T5"), ("clip", "CLIP")):
        encoder = getattr(text_encoders, attr, None)
        tokenizer, limit = getattr(encoder, "tokenizer", None), getattr(encoder, "max_length", None)
        if not callable(tokenizer) or isinstance(limit, bool) or not isinstance(limit, int):
            continue
        # An ASCII prompt has at most a token per character plus BOS/EOS (T5's word-start piece stands for
        # the space before it), so only one at least this long can overflow: FLUX's 512-token T5 never
        # tokenizes twice in a call, a low-latency path stays lean. Other text can take several tokens a
        # character (byte-level BPE, byte fallback), so it is always tokenized.
        long = [i for i, p in enumerate(prompts) if not p.isascii() or len(p) + 2 > limit]
        if not long:
            continue
        ids = tokenizer([prompts[i] for i in long], truncation=True, max_length=limit + 1)["input_ids"]
        notes += [f"{name}[{i}] ({label}, {limit} tokens kept)" for i, row in zip(long, ids) if len(row) > limit]
    if notes:
        warnings.warn(
            f"prompts longer than the text encoders take are truncated: {', '.join(notes)}; "
            "the model does not see the rest",
            UserWarning,
            stacklevel=5,  # warn_truncated < __call__ < torch.no_grad's wrapper < the pipeline's lock < the caller
        )


def warn_unknown_words(text_encoders: Any, prompts: list[str], name: str = "prompt") -> None:
    """A UserWarning naming the words of the prompts that a closed-vocabulary T5 (ShapesEval's) does not know:
    it spells them letter by letter, which the model never saw in training. Open vocabularies: nothing."""
    vocabulary = closed_vocabulary(getattr(text_encoders, "t5", None))
    if vocabulary is None:
        return
    unknown = [(i, unknown_words(prompt, vocabulary)) for i, prompt in enumerate(prompts)]
    notes = [f"{name}[{i}]: {', '.join(map(repr, words))}" for i, words in unknown if words]
    if notes:
        warnings.warn(
            f"words outside the text encoder's closed vocabulary of {len(vocabulary)} words: {'; '.join(notes)}; "
            "the model was never trained on them (they are spelled letter by letter), so the image will not "
            "follow them",
            UserWarning,
            stacklevel=5,  # warn_unknown_words < __call__ < torch.no_grad's wrapper < the pipeline's lock < the caller
        )


def side_error(name: str, value: Any, downsample: int, patch: int, max_size: int) -> str | None:
    """Why `value` is not a valid image side (a multiple of downsample x patch, at most max_size), or None."""
    m = downsample * patch
    if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m or value > max_size:
        return (
            f"{name} must be a multiple of {m} (autoencoder {downsample}x down, {patch}x{patch} patches) "
            f"between {m} and {max_size}, got {value!r}"
        )
    return None


def check_text_widths(text_encoders: Any, config: MMDiTConfig) -> None:
    t5, clip = getattr(text_encoders, "t5", None), getattr(text_encoders, "clip", None)
    if t5 is not None and t5.width != config.txt_dim:
        raise ValueError(f"the T5 encoder's width is {t5.width}, the model expects txt_dim={config.txt_dim}")
    if clip is not None and clip.width != config.vec_dim:
        raise ValueError(f"the CLIP encoder's width is {clip.width}, the model expects vec_dim={config.vec_dim}")


def check_prompt(prompt: Any, name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(p).__name__}")
    return list(prompt)


def plain_numbers(*values: Any) -> tuple[Any, ...]:
    """NumPy (or any numbers-ABC) integers and reals as Python int / float, so `seed=np.int64(3)` or a
    size from `np.arange` passes the checks; anything else (bools, tensors, strings) unchanged, for the
    checks to name."""
    return tuple(_plain_number(value) for value in values)


def _plain_number(value: Any) -> Any:
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_engine_options(fast_path: Any, max_size: Any) -> None:
    """The pipeline's own keywords (shared by __init__ and from_pretrained, which checks them before loading)."""
    if fast_path is not None and not isinstance(fast_path, FastPathConfig):
        raise TypeError(f"fast_path must be a FastPathConfig or None, got {type(fast_path).__name__}")
    check_int("max_size", max_size, 1)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
