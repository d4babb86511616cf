"""Export of the EMA weights for sampling: DIR/model.safetensors + DIR/config.json (what
selfe.sampling.pipeline.SelfEPipeline.from_pretrained reads) + DIR/train_config.json, written atomically; with
checkpoint.export_text_encoders / export_autoencoder also the (small) encoders, so DIR loads on its own (a
run on stand-in data with checkpoint.export_stand_ins: random-init stand-ins, selfe.train.stand_in_export).

Every rank calls `export_ema` (gathering the sharded weights is collective); rank 0 writes.
The file holds plain tensors under the unconverted model's keys, fp32 unless checkpoint.export_dtype halves
them: the trainer's EMA copy is never FP8-converted, and a converted network passed here is unwrapped too
(FP8 is a run-time choice, not a format).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from selfe.components.fp8 import plain_tensor
from selfe.components.text_encoders import DTYPE_NAMES
from selfe.sampling.pipeline_files import AE_FILE
from selfe.train.config import TrainConfig
from selfe.train.stand_in_export import trains_on_stand_ins, write_stand_ins


def pipeline_config(config: TrainConfig) -> dict:
    """config.json of the export: the model, and what sampling must match of training: the time shift,
    the autoencoder (the pixel one, or an exported trained one), the T5 length and the training resolution."""
    data = config.data
    out: dict = {
        "model": config.model.to_dict(),
        "sampler": {"time_shift": asdict(config.objective.time_shift), "guidance": config.checkpoint.export_guidance},
        "resolution": data.resolution,
    }
    if config.checkpoint.export_autoencoder:
        from selfe.components.autoencoder import config_from_file, flux1

        out["autoencoder"] = (config_from_file(_exported_autoencoder(config)) or flux1()).to_dict()
    elif data.encoders == "pixels":
        from selfe.train.sources import pixel_autoencoder

        out["autoencoder"] = pixel_autoencoder(data).config.to_dict()
    if data.encoders != "smoke":
        out["text"] = {"t5_max_length": data.t5_max_length}
    return out


def _exported_autoencoder(config: TrainConfig) -> str:
    """data.ae_path, which checkpoint.export_autoencoder copies into the export."""
    if config.data.encoders != "flux" or not config.data.ae_path:
        raise ValueError(
            "checkpoint.export_autoencoder needs data.encoders='flux' and data.ae_path, got "
            f"encoders={config.data.encoders!r}, ae_path={config.data.ae_path!r}"
        )
    return config.data.ae_path


def export_ema(ema_model: nn.Module, config: TrainConfig, out_dir: str | os.PathLike, rank: int = 0) -> Path:
    """Gather the (sharded) EMA network's full weights and write them, in checkpoint.export_dtype, as a
    pipeline directory."""
    full = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out_dir)
    if rank != 0:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = DTYPE_NAMES[config.checkpoint.export_dtype]
        tensors = {  # torchao's FSDP weight wrapper unwrapped; TE's FP8 metadata (`_extra_state`) is run-time state
            k: _stored(plain_tensor(v).detach(), dtype) for k, v in full.items() if not k.endswith("_extra_state")
        }
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = pipeline_config(config)
        if config.checkpoint.export_stand_ins and trains_on_stand_ins(config.data):
            meta.update(write_stand_ins(tmp, config))  # random encoders: the export samples on its own
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        if config.checkpoint.export_text_encoders:
            for name, source in (("text_encoder", config.data.t5_path), ("text_encoder_2", config.data.clip_path)):
                if not source:
                    raise ValueError(f"checkpoint.export_text_encoders needs data.t5_path and data.clip_path ({name})")
                shutil.copytree(source, tmp / name)
        if config.checkpoint.export_autoencoder:
            shutil.copyfile(_exported_autoencoder(config), tmp / AE_FILE)
        (tmp / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves no half-written OUT.tmp behind
        raise
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight as the export stores it: floating tensors in `dtype`, any other kind as it is."""
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def check_out_dir(source: str | os.PathLike, checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Refuse an output folder that export_ema's replace would turn on what it reads: OUT (or OUT.tmp,
    OUT.old, which it deletes) being or holding `source` (a run folder or a checkpoint) or the `checkpoint`
    read from it, or lying inside that checkpoint; or an OUT that is a file or a folder that is not an
    export (it is replaced wholesale). RUN/export, where the trainer itself exports, is fine."""
    read, given, out = Path(checkpoint).resolve(), Path(source).resolve(), Path(out_dir).resolve()
    for path in (out, out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")):
        if given.is_relative_to(path) or read.is_relative_to(path) or path.is_relative_to(read):
            raise ValueError(
                f"--out {out_dir} is, holds or lies inside the checkpoint {checkpoint} (the export replaces it and "
                "its .tmp/.old siblings wholesale); choose a folder outside it"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "model.safetensors").is_file():
        raise ValueError(
            f"--out {out_dir} is a non-empty folder but not an export (no model.safetensors); the export would "
            "replace it wholesale: choose another folder"
        )


def export_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, **checkpoint_overrides: Any) -> Path:
    """Export the EMA weights of a DCP checkpoint (a step_* folder, or a run folder: its newest complete
    checkpoint) as a pipeline directory, in one process, e.g. to evaluate a run while it trains.
    checkpoint_overrides: checkpoint.* fields that replace the run's own for this export (export_dtype,
    export_guidance), checked as the config checks them and recorded in its train_config.json.
    A damaged checkpoint is a ValueError naming the file; nothing in it is unpickled
    (selfe.train.checkpoint_reader)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from selfe.network.model import MMDiT
    from selfe.train.checkpoint import Checkpointer
    from selfe.train.checkpoint_reader import first_failure, load_dcp
    from selfe.train.config import load_config

    path = Path(source)
    if not (path / "meta.json").is_file():  # not a checkpoint: a run folder
        latest = Checkpointer(path / "checkpoints", keep=1).latest()
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run folder with one")
        path = latest
    check_out_dir(source, path, out_dir)  # before anything is loaded or written
    config_file = path / "config.json"
    try:
        config = load_config(config_file)
    except ValueError as err:  # bad JSON or values, or not UTF-8 at all; load_config may name the file itself
        raise ValueError(str(err) if str(config_file) in str(err) else f"{config_file}: {err}") from None
    if checkpoint_overrides:  # checked here (CheckpointConfig's own checks), before any weight is read
        config = replace(config, checkpoint=replace(config.checkpoint, **checkpoint_overrides))
    net = MMDiT(config.model)
    state = {"ema": net.state_dict()}
    try:
        with warnings.catch_warnings():  # one process on purpose (no_dist), not a misconfiguration
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load_dcp(path, state, no_dist=True)  # reads only the EMA entries; a damaged file is named
    except CheckpointException as err:  # the EMA entries do not fit the config's model
        raise ValueError(f"cannot read the EMA weights of {path}: {first_failure(err)}") from None
    net.load_state_dict(state["ema"])
    return export_ema(net, config, out_dir)


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of `selfe export`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="selfe export", description="Export a training checkpoint's EMA weights for sampling."
    )
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_* or a run folder (its newest checkpoint)")
    parser.add_argument("--out", required=True, type=Path, help="pipeline folder to write (replaced atomically)")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="stored dtype of the weights (default: the run's checkpoint.export_dtype, float32 unless set); "
        "float16 halves the file",
    )
    guidance = parser.add_mutually_exclusive_group()
    guidance.add_argument(
        "--guidance",
        type=float,
        metavar="OMEGA",
        help="the export's default EP-CFG omega (default: the run's checkpoint.export_guidance); "
        "`selfe generate --guidance` still overrides it per call",
    )
    guidance.add_argument("--no-guidance", action="store_true", help="the export samples without CFG by default")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {} if args.dtype is None else {"export_dtype": args.dtype}
    if args.guidance is not None or args.no_guidance:
        overrides["export_guidance"] = None if args.no_guidance else args.guidance
    try:
        out = export_checkpoint(args.checkpoint, args.out, **overrides)
    except (OSError, ValueError) as err:  # OSError: a missing file, a full disk, no permission
        parser.exit(2, f"selfe export: {err}\n")
    print(f"selfe export: {args.checkpoint} -> {out}")
    return 0
