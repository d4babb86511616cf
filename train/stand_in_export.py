"""SMOKE ONLY: the parts a run on stand-in data exports so its export samples on its own.

A run on procedural or synthetic latents, or with data.encoders=smoke, trained without a real autoencoder
or text encoders, so it has none to put into its export, and `selfe generate --model RUN/export` would need
--ae, --t5 and --clip. With checkpoint.export_stand_ins (on in the smoke preset) the export gets random-init
tiny ones sized to the model instead: a FLUX-architecture autoencoder with the run's latent grid (8x down,
model.in_channels channels) and T5 / CLIP snapshots of the model's text widths, whose T5 knows the
procedural captions' words whole. The directory is then complete and the whole sampling path runs; the
images mean nothing (the model never saw these encoders' outputs), as the run's own data meant nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfe.components.autoencoder import AutoEncoder, AutoEncoderConfig, save_autoencoder
from selfe.components.text_snapshots import DEFAULT_WORDS, make_clip_snapshot, make_t5_snapshot
from selfe.sampling.pipeline_files import AE_FILE, TEXT_DIRS
from selfe.train.config import DataSection, TrainConfig
from selfe.train.sources import COLOURS, SHAPES


def trains_on_stand_ins(data: DataSection) -> bool:
    """Whether the run's latents and text states come from no real encoder (so it has none to export)."""
    return data.source in ("procedural", "synthetic") or data.encoders == "smoke"


def write_stand_ins(out_dir: Path, config: TrainConfig) -> dict:
    """Write ae.safetensors, text_encoder/ (T5) and text_encoder_2/ (CLIP) under out_dir; returns the
    config.json entries that describe them ("autoencoder", "text")."""
    model, data = config.model, config.data
    autoencoder_config = AutoEncoderConfig(
        resolution=data.resolution,
        ch=8,
        ch_mult=(1,) * 4,  # three halvings: 8x down, as procedural, synthetic and smoke-encoded latents are
        num_res_blocks=1,
        z_channels=model.in_channels,
        norm_groups=8,
        scale_factor=1.0,
        shift_factor=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        autoencoder = AutoEncoder(autoencoder_config)
    save_autoencoder(autoencoder, out_dir / AE_FILE)
    words = tuple(dict.fromkeys((*DEFAULT_WORDS, *COLOURS, *SHAPES)))
    make_t5_snapshot(out_dir / TEXT_DIRS[0], d_model=model.txt_dim, words=words, seed=data.seed)
    make_clip_snapshot(out_dir / TEXT_DIRS[1], hidden_size=model.vec_dim, seed=(data.seed + 1) % 2**64)
    return {"autoencoder": autoencoder_config.to_dict(), "text": {"t5_max_length": data.text_length}}
