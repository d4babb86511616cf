"""A lossless "autoencoder" for pixel-space models: space-to-depth, scaled.

    latents = scale * (pixel_unshuffle(images, f) - shift)       images (B, C, H, W) -> (B, C f^2, H/f, W/f)
    images  = pixel_shuffle(latents / scale + shift, f)

It has the autoencoder interface the pipeline, the cache and the trainer use (`encode`, `decode`,
`tiled_decode`, `downsample_factor`, `config.z_channels`) and no weights, so small pixel-space models
(ShapesEval's 32x32 images) go through the same code as latent ones. With f = 8 and the MMDiT's patch
size 1, a token is an 8x8 pixel patch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor, nn

AUTOENCODER_TYPE = "space_to_depth"  # config.json's "autoencoder": {"type": ...} tag


@dataclass
class SpaceToDepthConfig:
    """f = downsample_factor; latents = scale_factor * (unshuffled pixels in [-1, 1] - shift_factor)."""

    downsample_factor: int = 8
    in_channels: int = 3
    scale_factor: float = 2.0  # [ours] flat-coloured scenes have pixel std ~0.3: bring it nearer to 1
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("downsample_factor", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SpaceToDepthConfig.{name} must be a positive int, got {value!r}")
        for name in ("scale_factor", "shift_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SpaceToDepthConfig.{name} must be a finite number, got {value!r}")
        if not self.scale_factor > 0:
            raise ValueError(f"SpaceToDepthConfig.scale_factor must be > 0, got {self.scale_factor!r}")

    @property
    def z_channels(self) -> int:
        return self.in_channels * self.downsample_factor**2

    def to_dict(self) -> dict:
        return {"type": AUTOENCODER_TYPE, **asdict(self)}


class SpaceToDepthAutoEncoder(nn.Module):
    """Images in [-1, 1] <-> latents, exactly invertible (see the module docstring)."""

    def __init__(self, config: SpaceToDepthConfig | None = None):
        super().__init__()
        self.config = config or SpaceToDepthConfig()

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a floating-point (B, C, H, W) tensor, got {got}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channels, got shape {tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got {tuple(x.shape[2:])}")

    def encode(self, images: Tensor, **_: object) -> Tensor:
        """images (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels, H / f, W / f)."""
        c = self.config
        self._check(images, c.in_channels, "images", c.downsample_factor)
        return c.scale_factor * (F.pixel_unshuffle(images, c.downsample_factor) - c.shift_factor)

    def decode(self, latents: Tensor, batch_chunk: int | None = None) -> Tensor:
        """latents (B, z_channels, h, w) -> images (B, in_channels, h f, w f) in ~[-1, 1]."""
        c = self.config
        self._check(latents, c.z_channels, "latents", 1)
        return F.pixel_shuffle(latents / c.scale_factor + c.shift_factor, c.downsample_factor)

    def tiled_decode(
        self, latents: Tensor, tile: int = 64, overlap: int = 16, batch_chunk: int | None = None
    ) -> Tensor:
        """Same as `decode`: every output pixel depends on one latent pixel, so there are no seams to blend."""
        return self.decode(latents)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))
