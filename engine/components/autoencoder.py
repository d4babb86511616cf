"""The FLUX.1 autoencoder (16-channel latents, 8x down), built so the released ae.safetensors loads as is.

Architecture as in black-forest-labs/flux `modules/autoencoder.py`: a convolutional encoder and
decoder of ResNet blocks with GroupNorm, one single-head self-attention block in each mid block,
strided-conv downsampling and nearest-neighbour upsampling, a diagonal Gaussian posterior, and the
latent affine `scale * (z - shift)`. Module and parameter names match the released key names
("encoder.down.0.block.0.norm1.weight", "decoder.up.3.upsample.conv.weight", ...); the released file
has 244 tensors and no `quant_conv` (that is the diffusers layout, not this one).

Decoder level order: `decoder.up[i]` works at the same resolution as `encoder.down[i]`, so
`up[0]` is the last (full-resolution) level applied and `up[len - 1]` the first.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfe.components.weights import load_safetensors_into
from selfe.utils.atomic import atomic_write_bytes


@dataclass
class AutoEncoderConfig:
    """Hyper-parameters of the autoencoder; `flux1()` is the released one, `tiny()` is for tests."""

    resolution: int = 256  # the training resolution; kept for fidelity, any multiple of the factor works
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128  # base channel count; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 16
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        if isinstance(self.ch_mult, (str, bytes)) or not isinstance(self.ch_mult, (list, tuple)):
            raise ValueError(
                f"AutoEncoderConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}"
            )
        self.ch_mult = tuple(self.ch_mult)  # a list from a JSON round trip becomes the tuple again
        for name in (
            "resolution",
            "in_channels",
            "out_channels",
            "ch",
            "num_res_blocks",
            "z_channels",
            "norm_groups",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoEncoderConfig.{name} must be a positive int, got {value!r}")
        if not self.ch_mult or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.ch_mult
        ):
            raise ValueError(
                f"AutoEncoderConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}"
            )
        for mult in (1, *self.ch_mult):
            if (self.ch * mult) % self.norm_groups:
                raise ValueError(
                    f"AutoEncoderConfig.norm_groups={self.norm_groups} must divide every level's channels; "
                    f"ch * {mult} = {self.ch * mult} is not divisible"
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"AutoEncoderConfig.resolution={self.resolution} must be divisible by the downsample factor "
                f"{self.downsample_factor}"
            )
        for name in ("norm_eps", "scale_factor", "shift_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AutoEncoderConfig.{name} must be a finite number, got {value!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"AutoEncoderConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.scale_factor > 0:
            raise ValueError(f"AutoEncoderConfig.scale_factor must be > 0, got {self.scale_factor!r}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2^(levels - 1), 8 for FLUX.1."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        """The fields as JSON values (config.json's "autoencoder" entry, the safetensors metadata)."""
        out = asdict(self)
        out["ch_mult"] = list(self.ch_mult)
        return out


def flux1() -> AutoEncoderConfig:
    """The released FLUX.1 autoencoder (ae.safetensors of FLUX.1-dev / -schnell)."""
    return AutoEncoderConfig()


def tiny() -> AutoEncoderConfig:
    """Same architecture at test size: 2 levels (2x down), 32/64 channels, 16 latent channels."""
    return AutoEncoderConfig(
        resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, norm_groups=8
    )


AUTOENCODER_PRESETS = {"flux1": flux1, "tiny": tiny}


def _group_norm(config: AutoEncoderConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, conv3x3) twice plus a skip, 1x1-projected if channels change. x: (B, C, H, W)."""

    def __init__(self, config: AutoEncoderConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Named as in the checkpoint; absent when the channel count is kept.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs as projections. x: (B, C, H, W)."""

    def __init__(self, config: AutoEncoderConfig, channels: int):
        super().__init__()
        self.norm = _group_norm(config, channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, H*W, C): one head of width C
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        attended = F.scaled_dot_product_attention(
            tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed))
        )
        attended = attended.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one (torch convs pad symmetrically only), stride-2 conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution (keys `mid.block_1/attn_1/block_2`)."""

    def __init__(self, config: AutoEncoderConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        self.attn_1 = AttnBlock(config, channels)
        self.block_2 = ResnetBlock(config, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder level: ResNet blocks (`block`), then a `downsample` except at the last level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder level: ResNet blocks (`block`), then an `upsample` except at full resolution."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """images (B, in_channels, H, W) -> posterior moments (B, 2 * z_channels, H / f, W / f), mean first."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        levels, block_in = [], ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(config, block_in, ch * m))
                block_in = ch * m
            last = i == len(mult) - 1
            levels.append(DownLevel(blocks, None if last else Downsample(block_in)))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(config, block_in)
        self.norm_out = _group_norm(config, block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> images (B, out_channels, h * f, w * f)."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(config, block_in)
        levels = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(config, block_in, ch * mult[i]))
                block_in = ch * mult[i]
            levels.insert(0, UpLevel(blocks, None if i == 0 else Upsample(block_in)))
        self.up = nn.ModuleList(levels)  # up[i] at encoder level i's resolution; applied last to first
        self.norm_out = _group_norm(config, block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """Images in [-1, 1] <-> normalised latents `scale * (z - shift)`; see `encode` / `decode`."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # The decoder compiled per shape (selfe.utils.compiling.CompiledPerShape), set by the pipeline's fast
        # path; `set_decoder_channels_last` switches its memory format.
        self.compiled_decoder: Callable[[Tensor], Tensor] | None = None
        self.decoder_channels_last = False

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _param(self) -> Tensor:
        return next(self.parameters())

    def _check(self, x: Tensor, channels: int, what: str, divisible: bool) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a 4-D tensor (B, C, H, W), got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be floating point, got {x.dtype}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channels, got shape {tuple(x.shape)}")
        f = self.downsample_factor
        if divisible and (x.shape[2] % f or x.shape[3] % f):
            raise ValueError(
                f"{what} height and width must be divisible by the downsample factor {f}, "
                f"got {tuple(x.shape[2:])}"
            )
        param = self._param()
        if x.device != param.device:
            raise ValueError(f"{what} are on {x.device} but the autoencoder is on {param.device}")
        return x.to(param.dtype)

    def posterior(self, images: Tensor, batch_chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """images: (B, in_channels, H, W) in [-1, 1] -> (mean, logvar), each (B, z_channels, H / f, W / f).

        Unnormalised (before scale/shift). batch_chunk: encode at most this many images at a time.
        """
        images = self._check(images, self.config.in_channels, "images", divisible=True)
        moments = torch.cat([self.encoder(part) for part in _batch_chunks(images, batch_chunk)])
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode(
        self,
        images: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        batch_chunk: int | None = None,
    ) -> Tensor:
        """images: (B, in_channels, H, W) in [-1, 1] -> latents (B, z_channels, H / f, W / f), normalised.

        sample: False takes the posterior mean (deterministic); True draws z = mean + std * noise,
        noise from `generator` for the whole batch at once, so chunking does not change the draw.
        """
        mean, logvar = self.posterior(images, batch_chunk)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: Tensor, batch_chunk: int | None = None) -> Tensor:
        """latents: (B, z_channels, h, w), normalised -> images (B, out_channels, h * f, w * f) in ~[-1, 1].

        batch_chunk: decode at most this many latents at a time (peak memory scales with it).
        """
        z = self.unnormalize(self._check(latents, self.config.z_channels, "latents", divisible=False))
        return self._decode_z(z, batch_chunk)

    def _decode_z(self, z: Tensor, batch_chunk: int | None) -> Tensor:
        decoder = self.decoder if self.compiled_decoder is None else self.compiled_decoder
        if self.decoder_channels_last:  # the output comes back in the usual layout
            z = z.contiguous(memory_format=torch.channels_last)
            return torch.cat([decoder(part).contiguous() for part in _batch_chunks(z, batch_chunk)])
        return torch.cat([decoder(part) for part in _batch_chunks(z, batch_chunk)])

    def set_decoder_channels_last(self, on: bool) -> None:
        """Hold the decoder's convolution weights, and run its activations, in channels-last (NHWC) memory
        format (on: True) or the default (False). Same values up to the convolutions' rounding; GPUs run
        NHWC convolutions faster. A later `.to(dtype)` keeps the format."""
        self.decoder.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        self.decoder_channels_last = on

    def unnormalize(self, latents: Tensor) -> Tensor:
        """Normalised latents -> the decoder's z: `latents / scale + shift` (inverse of encode's affine)."""
        return latents / self.config.scale_factor + self.config.shift_factor

    def tiled_decode(
        self, latents: Tensor, tile: int = 64, overlap: int = 16, batch_chunk: int | None = None
    ) -> Tensor:
        """Decode overlapping spatial tiles of `tile` x `tile` latent pixels and blend them.

        For outputs too large to decode at once. Tiles step by `tile - overlap` (the last one is
        aligned to the far edge, so all tiles have the same size); in the overlaps each tile's
        weight ramps linearly to its edge, so seams fade instead of cutting. Not identical to
        `decode`: GroupNorm statistics and the mid-block attention see one tile, not the whole
        latent. A latent no larger than `tile` is decoded in one piece, exactly as `decode`.
        """
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive int (latent pixels), got {tile!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"overlap must be an int in [0, tile={tile}), got {overlap!r}")
        z = self.unnormalize(self._check(latents, self.config.z_channels, "latents", divisible=False))
        b, _, h, w = z.shape
        f = self.downsample_factor
        if h <= tile and w <= tile:
            return self._decode_z(z, batch_chunk)
        out = torch.zeros(b, self.config.out_channels, h * f, w * f, device=z.device, dtype=torch.float32)
        total_weight = torch.zeros(1, 1, h * f, w * f, device=z.device, dtype=torch.float32)
        for y0, th in _tile_spans(h, tile, overlap):
            for x0, tw in _tile_spans(w, tile, overlap):
                part = z[:, :, y0 : y0 + th, x0 : x0 + tw]
                decoded = self._decode_z(part, batch_chunk)
                weight = (
                    _edge_ramp(y0, th, h, overlap, f, z.device)[:, None]
                    * _edge_ramp(x0, tw, w, overlap, f, z.device)[None, :]
                )
                rows, cols = slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f)
                out[:, :, rows, cols] += decoded.float() * weight
                total_weight[:, :, rows, cols] += weight
        return (out / total_weight).to(z.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction: decode(encode(images)) with the posterior mean."""
        return self.decode(self.encode(images))


def _batch_chunks(x: Tensor, batch_chunk: int | None) -> tuple[Tensor, ...]:
    if batch_chunk is None:
        return (x,)
    if isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int) or batch_chunk < 1:
        raise ValueError(f"batch_chunk must be a positive int or None, got {batch_chunk!r}")
    return x.split(batch_chunk)


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one axis: step `tile - overlap`, the last flush with the end."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, tile) for s in starts]


def _edge_ramp(start: int, length: int, size: int, overlap: int, f: int, device: torch.device) -> Tensor:
    """Blend weight along one axis of a tile, in output pixels: ramps over `overlap * f` pixels at
    each edge that borders another tile, 1 elsewhere and at the image border; always > 0."""
    n = length * f
    weight = torch.ones(n, device=device, dtype=torch.float32)
    ramp_px = overlap * f
    if ramp_px == 0:
        return weight
    ramp = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / ramp_px
    if start > 0:
        weight = torch.minimum(weight, ramp)
    if start + length < size:
        weight = torch.minimum(weight, ramp.flip(0))
    return weight


# safetensors metadata key holding the AutoEncoderConfig as JSON (files this engine writes; FLUX.1's has none)
CONFIG_METADATA_KEY = "selfe.autoencoder_config"


def config_from_file(path: str | os.PathLike) -> AutoEncoderConfig | None:
    """The AutoEncoderConfig stored in a .safetensors file's metadata by `save_autoencoder`, else None."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder weights not found (or not a file): {os.fspath(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    except SafetensorError as err:  # a truncated or non-safetensors file
        raise ValueError(f"cannot read {os.fspath(path)} as safetensors: {err}") from err
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON: {err}") from err
    known = {f.name for f in fields(AutoEncoderConfig)}
    if not isinstance(entry, dict) or set(entry) - known:
        raise ValueError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not an AutoEncoderConfig: {raw[:200]}")
    return AutoEncoderConfig(**entry)


def save_autoencoder(model: AutoEncoder, path: str | os.PathLike) -> None:
    """Write the weights (fp32) with the config in the metadata, atomically: `load_autoencoder(path)` rebuilds it."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_autoencoder(
    path: str | os.PathLike,
    config: AutoEncoderConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """Build the autoencoder on the meta device and load a .safetensors file into it.

    path: e.g. the released FLUX.1 `ae.safetensors`, loaded without renaming. config: defaults to the
    one in the file's metadata (files written by `save_autoencoder`), else `flux1()`. Every key and shape
    is checked (from the file header, before data is read); a mismatch raises
    `selfe.components.weights.StateDictMismatchError` naming the keys. Returns the model in eval mode on `device`
    in `dtype`.
    """
    if config is None:
        config = config_from_file(path) or flux1()
    if not isinstance(config, AutoEncoderConfig):
        raise TypeError(f"config must be an AutoEncoderConfig, got {type(config).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    with torch.device("meta"):
        model = AutoEncoder(config)
    load_safetensors_into(model, path, device=device, dtype=dtype)
    return model.eval()
