"""Export of the EMA weights for sampling: DIR/model.safetensors + DIR/config.json (what
selfe.pipeline.SelfEPipeline.from_pretrained reads) + DIR/train_config.json, written atomically.

Every rank calls `export_ema` (gathering the sharded weights is collective); rank 0 writes.
The file is always plain fp32 under the unconverted model's keys: the trainer's EMA copy is never FP8-
converted, and a converted network passed here is unwrapped too (FP8 is a run-time choice, not a format).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from selfe.fp8 import plain_tensor
from selfe.train.config import TrainConfig


def pipeline_config(config: TrainConfig) -> dict:
    """config.json of the export: the model, and what sampling must match of training: the time shift,
    the pixel autoencoder (encoders="pixels"), the T5 length and the training resolution."""
    data = config.data
    out: dict = {
        "model": config.model.to_dict(),
        "sampler": {"time_shift": asdict(config.objective.time_shift)},
        "resolution": data.resolution,
    }
    if data.encoders == "pixels":
        from selfe.train.sources import pixel_autoencoder

        out["autoencoder"] = pixel_autoencoder(data).config.to_dict()
    if data.encoders != "smoke":
        out["text"] = {"t5_max_length": data.t5_max_length}
    return out


def export_ema(ema_model: nn.Module, config: TrainConfig, out_dir: str | os.PathLike, rank: int = 0) -> Path:
    """Gather the (sharded) EMA network's full weights and write them, fp32, as a pipeline directory."""
    full = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out_dir)
    if rank != 0:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {  # torchao's FSDP weight wrapper unwrapped; TE's FP8 metadata (`_extra_state`) is run-time state
        k: plain_tensor(v).detach().to(torch.float32).contiguous()
        for k, v in full.items()
        if not k.endswith("_extra_state")
    }
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(pipeline_config(config), indent=1))
    if config.checkpoint.export_text_encoders:
        for name, source in (("text_encoder", config.data.t5_path), ("text_encoder_2", config.data.clip_path)):
            if not source:
                raise ValueError(f"checkpoint.export_text_encoders needs data.t5_path and data.clip_path ({name})")
            shutil.copytree(source, tmp / name)
    (tmp / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
