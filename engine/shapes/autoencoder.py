"""A tiny FLUX-architecture autoencoder trained on ShapesEval scenes (`selfe data shapes --autoencoder trained`).

The issue allows pixels through an identity autoencoder "or a tiny trained one". This is the trained one:
the FLUX.1 encoder/decoder (selfe.components.autoencoder, same module and key names) at 16/32/64 channels, 4x down to
8x8x8 latents. Why it helps the denoiser: a 32x32x3 scene is 3072 pixel values the velocity must carry
noise-free through a width-128 network, but only 512 latent values; and the decoder, trained on clean
scenes only, maps what is left of the noise onto flat colours and sharp edges.

Training: reconstruction MSE in [-1, 1] on posterior samples plus a small KL term (kl_weight), AdamW with
a linear decay. Afterwards the latent affine (shift, scale) is set from the posterior means of the data, so
normalised latents have zero mean and unit variance like FLUX.1's. The file is an ordinary `ae.safetensors`
whose metadata carries the AutoEncoderConfig, so `selfe.components.autoencoder.load_autoencoder` rebuilds it alone.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from selfe.components.autoencoder import AutoEncoder, AutoEncoderConfig, save_autoencoder
from selfe.train.config import SHAPES_AE_CHANNELS, OptimConfig
from selfe.train.lr import lr_at


def shapes_autoencoder_config() -> AutoEncoderConfig:
    """16/32/64 channels, 4x down, 8 latent channels: 0.7M parameters, 0.4 s per step of 64 on 2 CPU cores."""
    return AutoEncoderConfig(
        resolution=32, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=SHAPES_AE_CHANNELS, norm_groups=8
    )


@dataclass
class AutoEncoderTraining:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    final_lr: float = 1e-4
    warmup_steps: int = 50
    kl_weight: float = 1e-4  # per latent element, against the per-pixel MSE: keeps the posterior smooth
    seed: int = 0
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoEncoderTraining.{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and self.final_lr > 0):
            raise ValueError(f"AutoEncoderTraining lr and final_lr must be > 0, got {self.lr}, {self.final_lr}")
        if self.kl_weight < 0:
            raise ValueError(f"AutoEncoderTraining.kl_weight must be >= 0, got {self.kl_weight}")


def load_manifest_images(manifest: Path, image_size: int = 32) -> tuple[Tensor, dict[str, int]]:
    """The manifest's usable images as (N, 3, image_size, image_size) uint8, and the row counts.

    Rows go through the data pipeline's scan (malformed, missing, unreadable or small images are skipped
    and counted); an image that fails to decode is skipped and counted too; a larger one is resized."""
    from PIL import Image

    from selfe.train.data.manifest import UNDECODABLE_IMAGE, ManifestConfig, scan_manifest

    scanned = scan_manifest(manifest, config=ManifestConfig(min_side=image_size))
    images = []
    for sample in scanned.samples:
        try:
            with Image.open(sample.path) as image:
                rgb = image.convert("RGB")
                if rgb.size != (image_size, image_size):
                    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
                images.append(np.asarray(rgb))
        except OSError as err:
            scanned.stats.skip(UNDECODABLE_IMAGE, sample.line, str(err))
    scanned.stats.rows_ok = len(images)
    if not images:
        raise ValueError(f"{manifest} has no usable {image_size}x{image_size} image: {scanned.stats.summary()}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), scanned.stats.as_dict()


def to_unit(images: Tensor) -> Tensor:
    """uint8 images -> float in [-1, 1], the autoencoder's input range."""
    return images.float() / 127.5 - 1.0


def train_autoencoder(
    images: Tensor,
    ae_config: AutoEncoderConfig | None = None,
    config: AutoEncoderTraining | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[AutoEncoder, list[dict]]:
    """Train on `images` ((N, 3, H, W) uint8, kept on the host) on `device`; returns the autoencoder (eval
    mode, on `device`, latent affine fitted) and the logged losses."""
    ae_config = shapes_autoencoder_config() if ae_config is None else ae_config
    config = AutoEncoderTraining() if config is None else config
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG alone
        torch.manual_seed(config.seed)
        # Unit affine while training: the fitted shift/scale are set afterwards from the trained posterior.
        ae = AutoEncoder(replace(ae_config, scale_factor=1.0, shift_factor=0.0)).to(device).train()
    schedule = OptimConfig(lr=config.lr, final_lr=config.final_lr, warmup_steps=config.warmup_steps)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    log: list[dict] = []
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule, config.steps)  # the trainer's warm-up + linear decay
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        x = to_unit(images[index].to(device))
        mean, logvar = ae.posterior(x)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(device)
        mse = (ae.decoder(z) - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = mse + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"autoencoder loss is {loss.item()} at step {step}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - start
            rate = (step + 1) / elapsed
            entry = {"step": step + 1, "mse": mse.item(), "kl": kl.item(), "lr": optimizer.param_groups[0]["lr"]}
            log.append(entry)
            if progress:
                eta = (config.steps - step - 1) / rate
                print(
                    f"autoencoder {step + 1}/{config.steps}  mse {entry['mse']:.5f}  kl {entry['kl']:.3f}  "
                    f"{rate:.2f} it/s  ETA {eta / 60:.1f} min",
                    file=sys.stderr,
                    flush=True,
                )
    ae.eval()
    ae.config = fitted_affine(ae, images)
    return ae, log


@torch.no_grad()
def fitted_affine(ae: AutoEncoder, images: Tensor, count: int = 4096, batch: int = 512) -> AutoEncoderConfig:
    """ae's config with shift = mean and scale = 1 / std of the posterior means over (up to) `count` images."""
    device = next(ae.parameters()).device
    means = [
        ae.posterior(to_unit(images[i : i + batch].to(device)))[0] for i in range(0, min(count, len(images)), batch)
    ]
    z = torch.cat(means).double()
    return replace(ae.config, shift_factor=float(z.mean()), scale_factor=float(1.0 / z.std()))


@torch.no_grad()
def round_trip(ae: AutoEncoder, images: Tensor, batch: int = 256) -> np.ndarray:
    """uint8 (N, 3, H, W) -> decode(encode(.)) as uint8 (N, H, W, 3)."""
    out = []
    device = next(ae.parameters(), torch.empty(0)).device  # (a parameter-free stand-in works on the host)
    for i in range(0, len(images), batch):
        decoded = ae.decode(ae.encode(to_unit(images[i : i + batch].to(device))))
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def reconstruction_score(ae: AutoEncoder, seed: int = 7, images_per_category: int = 48) -> dict:
    """The ShapesEval score of decode(encode(x)) for held-out generator images of the evaluation prompts:
    the ceiling the autoencoder puts on any model trained in its latents (the images themselves score 1)."""
    from selfe.shapes.scene import evaluation_prompts, render
    from selfe.shapes.scorer import score_image, summarize

    prompts = evaluation_prompts(images_per_category)
    rng = np.random.default_rng(seed)
    real = np.stack([render(p, rng) for p in prompts])
    decoded = round_trip(ae, torch.from_numpy(real).permute(0, 3, 1, 2).contiguous())
    return summarize(prompts, [score_image(p, image) for p, image in zip(prompts, decoded)])


def train_and_save(
    manifest: Path,
    out_file: Path,
    config: AutoEncoderTraining | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict:
    """Train on the manifest's images, write `out_file` (safetensors, config in its metadata) atomically,
    and return a report: the manifest's row counts, the losses and the held-out reconstruction score."""
    images, rows = load_manifest_images(manifest)
    ae, log = train_autoencoder(images, config=config, progress=progress, device=device)
    save_autoencoder(ae, out_file)
    return {"rows": rows, "losses": log, "reconstruction": reconstruction_score(ae), "config": ae.config.to_dict()}
