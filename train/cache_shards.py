"""What one cache shard holds and how it is encoded: the cache config, the shard plan, and
decode -> encode -> collect for one shard. Orchestration (resume, index, files) is selfe.train.cache.

Encoders are two protocols, so this module needs no real model:
    image_encoder(images (B, 3, H, W) float in [-1, 1]) -> latents (B, C, H/8, W/8)
    text_encoder(prompts: list[str]) -> dict(txt=(B, Lt, d), txt_mask=(B, Lt) bool, pooled=(B, d_pooled))
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from selfe.train.data.buckets import BucketConfig
from selfe.train.data.cached import TEXT_KEYS, pad_text
from selfe.train.data.images import ImageReadError, load_for_bucket
from selfe.train.data.manifest import UNDECODABLE_IMAGE, DataStats, ManifestConfig

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CacheConfig:
    """resolutions: base resolutions to cache (each sample at each); shard_size: samples per shard;
    encode_batch_size: images / prompts per encoder call; num_threads: image decode threads;
    store_dtype: cast floating tensors to this before saving (None keeps the encoders' dtype);
    encoder_tag: names the encoders in the fingerprint, so a resume with other encoders is refused;
    latent_factor: image pixels per latent pixel along a side (8: the FLUX autoencoder and ShapesEval's
    space-to-depth one)."""

    resolutions: tuple[int, ...] = (256,)
    shard_size: int = 1024
    encode_batch_size: int = 16
    num_threads: int = 4
    store_dtype: str | None = None
    encoder_tag: str = ""
    latent_factor: int = 8
    buckets: BucketConfig = field(default_factory=BucketConfig)
    checks: ManifestConfig = field(default_factory=ManifestConfig)

    def __post_init__(self) -> None:
        self.resolutions = tuple(int(r) for r in self.resolutions)
        if not self.resolutions or len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"CacheConfig.resolutions must be non-empty and distinct, got {self.resolutions}")
        for r in self.resolutions:
            self.buckets.buckets(r)  # validates: positive multiple of the bucket multiple
        for name in ("shard_size", "encode_batch_size", "num_threads", "latent_factor"):
            value = getattr(self, name)
            least = 0 if name == "num_threads" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"CacheConfig.{name} must be an int >= {least}, got {value!r}")
        if self.store_dtype is not None and self.store_dtype not in STORE_DTYPES:
            raise ValueError(
                f"CacheConfig.store_dtype must be None or one of {list(STORE_DTYPES)}, got {self.store_dtype!r}"
            )


@dataclass(frozen=True)
class ShardPlan:
    """One planned shard: samples `indices` (manifest sample positions) of one aspect class at one base
    resolution, resized to the bucket (height, width); has_text: it also stores the text states."""

    id: int
    resolution: int
    aspect_class: int
    height: int
    width: int
    indices: tuple[int, ...]  # planned samples; undecodable ones drop out when the shard is written
    has_text: bool

    @property
    def file(self) -> str:
        return f"shard-{self.id:06d}.safetensors"


def plan_shards(aspect_classes: Sequence[int], config: CacheConfig) -> list[ShardPlan]:
    """Shards in order: per resolution, per aspect class, samples in manifest order, shard_size each."""
    shards: list[ShardPlan] = []
    for r_i, resolution in enumerate(config.resolutions):
        buckets = config.buckets.buckets(resolution)
        for c in sorted(set(aspect_classes)):
            members = [i for i, k in enumerate(aspect_classes) if k == c]
            for start in range(0, len(members), config.shard_size):
                chunk = tuple(members[start : start + config.shard_size])
                h, w = buckets[c]
                shards.append(ShardPlan(len(shards), resolution, c, h, w, chunk, has_text=r_i == 0))
    return shards


def cast_floats(tensors: dict[str, torch.Tensor], store_dtype: str | None) -> dict[str, torch.Tensor]:
    if store_dtype is None:
        return tensors
    dtype = STORE_DTYPES[store_dtype]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _prefetch(
    fn: Callable[[int], Any], items: Sequence[int], pool: ThreadPoolExecutor | None, ahead: int
) -> Iterator[Any]:
    """fn(item) for each item, in order, with at most `ahead` calls submitted to `pool` beyond the
    one being consumed (pool.map would submit them all at once and hold every result)."""
    if pool is None:
        yield from map(fn, items)
        return
    queue: deque[Future] = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) > ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def trim_text(txt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding and exactly zero in every row (lossless)."""
    used = mask.any(0) | (txt != 0).flatten(2).any(2).any(0)
    nonzero = used.nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return txt[:, :length].contiguous(), mask[:, :length].contiguous()


def check_text(out: Any, batch: int) -> dict[str, torch.Tensor]:
    if not isinstance(out, dict) or not set(TEXT_KEYS) <= set(out):
        raise TypeError("text_encoder must return dict(txt=(B, Lt, d), txt_mask=(B, Lt) bool, pooled=(B, d))")
    txt, mask, pooled = out["txt"], out["txt_mask"], out["pooled"]
    if (
        txt.ndim != 3
        or txt.shape[0] != batch
        or mask.shape != txt.shape[:2]
        or pooled.ndim != 2
        or pooled.shape[0] != batch
    ):
        raise ValueError(
            f"text_encoder shapes for {batch} prompts: txt {tuple(txt.shape)}, txt_mask {tuple(mask.shape)}, "
            f"pooled {tuple(pooled.shape)}; expected (B, Lt, d), (B, Lt), (B, d)"
        )
    return {
        "txt": txt.detach().cpu(),
        "txt_mask": mask.detach().cpu().bool(),
        "pooled": pooled.detach().cpu(),
    }


def encode_shard(
    plan: ShardPlan,
    samples: Sequence[Any],
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    config: CacheConfig,
    device: torch.device,
    pool: ThreadPoolExecutor | None,
    stats: DataStats,
    progress: tqdm,
) -> tuple[dict[str, torch.Tensor], list[str], list[int], int]:
    """Decode, encode and collect one shard: (tensors, captions, undecodable sample indices, text length
    Lt before trimming, 0 for a shard without text)."""
    load = lambda i: load_for_bucket(samples[i].path, plan.height, plan.width)

    def safe_load(i: int) -> torch.Tensor | ImageReadError:
        try:
            return load(i)
        except ImageReadError as err:
            return err

    # Decoding runs a few encoder batches ahead of the encoder, bounded so memory stays small.
    ahead = 2 * max(config.encode_batch_size, config.num_threads)
    images = _prefetch(safe_load, plan.indices, pool, ahead)
    kept: list[int] = []
    bad: list[int] = []
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "txt": [], "txt_mask": [], "pooled": []}
    lengths: set[int] = set()  # Lt of every text batch, before trimming
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([img for _, img in pending]).to(device)
        latents = image_encoder(batch)
        h, w = plan.height // config.latent_factor, plan.width // config.latent_factor
        if latents.ndim != 4 or latents.shape[0] != len(pending) or tuple(latents.shape[2:]) != (h, w):
            raise ValueError(
                f"image_encoder returned {tuple(latents.shape)} for images {tuple(batch.shape)}; "
                f"expected (B, C, {h}, {w})"
            )
        parts["latents"].append(latents.detach().cpu())
        if plan.has_text:
            text = check_text(text_encoder([samples[i].caption for i, _ in pending]), len(pending))
            lengths.add(text["txt"].shape[1])
            # Trimmed per batch (host memory ~ real tokens, not Lt); padded to the shard's longest below.
            txt, mask = trim_text(text["txt"], text["txt_mask"])
            parts["txt"].append(txt)
            parts["txt_mask"].append(mask)
            parts["pooled"].append(text["pooled"])
        kept.extend(i for i, _ in pending)
        progress.update(len(pending))
        pending.clear()

    for index, image in zip(plan.indices, images):
        if isinstance(image, ImageReadError):
            bad.append(index)
            stats.skip(UNDECODABLE_IMAGE, samples[index].line, str(image))
            progress.update(1)
            continue
        pending.append((index, image))
        if len(pending) == config.encode_batch_size:
            flush()
    flush()
    if not kept:
        return {}, [], bad, 0
    text_length = 0
    tensors = {"latents": torch.cat(parts["latents"]), "indices": torch.tensor(kept, dtype=torch.int64)}
    if plan.has_text:
        if len(lengths) != 1:
            raise ValueError(f"text_encoder returned different lengths Lt {sorted(lengths)}; pad to a fixed length")
        # The shard's trimmed length is the longest batch's, so this equals trimming the whole shard.
        longest = max(t.shape[1] for t in parts["txt"])
        padded = [pad_text(t, m, longest) for t, m in zip(parts["txt"], parts["txt_mask"])]
        txt, mask = torch.cat([t for t, _ in padded]), torch.cat([m for _, m in padded])
        tensors.update(txt=txt, txt_mask=mask, pooled=torch.cat(parts["pooled"]))
        text_length = lengths.pop()
    return cast_floats(tensors, config.store_dtype), [samples[i].caption for i in kept], bad, text_length
