"""The image-text loader: bucketed batches of decoded images in a deterministic, resumable order.

Decoding runs on a thread pool (PIL releases the GIL while decoding and resizing), a few batches
ahead of the consumer. The order never depends on thread timing: each batch slot is a pure function
of the sampler's plan. A sample whose pixels fail to decode is counted once (reason
`undecodable_image`, logged with its manifest line) and replaced by a substitute from the same aspect
class, chosen by an RNG keyed on (seed, step, slot), so the batch keeps its size. If every substitute
fails too the batch shrinks; an empty batch is skipped.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfe.train.data.buckets import BucketConfig, ResolutionSchedule
from selfe.train.data.cached import INDEX_NAME, CachedDataset, file_sha256, read_index
from selfe.train.data.images import ImageReadError, load_for_bucket
from selfe.train.data.manifest import UNDECODABLE_IMAGE, DataStats, Manifest, ManifestConfig, scan_manifest
from selfe.train.data.sampler import REMAINDER_POLICIES, BatchPlan, BucketBatchSampler

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    """batch_size: per rank; remainder: "drop" or "pad" (see selfe.train.data.sampler);
    num_threads: decode threads (0 = decode in the calling thread); prefetch_batches: batches decoded
    ahead; max_substitute_tries: substitutes tried for an undecodable image before the batch shrinks;
    batches_per_step: micro-batches per optimizer step (they share one drawn resolution)."""

    batch_size: int = 32
    seed: int = 0
    shuffle: bool = True
    remainder: str = "drop"
    num_threads: int = 4
    prefetch_batches: int = 2
    max_substitute_tries: int = 8
    batches_per_step: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "batches_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoaderConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_threads", "prefetch_batches", "max_substitute_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LoaderConfig.{name} must be an int >= 0, got {value!r}")
        if self.remainder not in REMAINDER_POLICIES:
            raise ValueError(f"LoaderConfig.remainder must be one of {REMAINDER_POLICIES}, got {self.remainder!r}")


@dataclass
class DataConfig:
    """Everything the trainer needs to build its loaders. base_dir defaults to each manifest's folder.

    cache_dir: a `selfe cache` folder for the training manifest; when it holds a cache, training
    batches are read from it (latents and text states) instead of decoding images.
    cache_verify: check each cache file against the checksum in its index when first read (CachedDataset).
    """

    manifest: str = ""
    base_dir: str | None = None
    val_manifest: str | None = None
    val_base_dir: str | None = None
    checks: ManifestConfig = field(default_factory=ManifestConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    schedule: ResolutionSchedule = field(default_factory=ResolutionSchedule)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    cache_dir: str | None = None
    cache_verify: bool = True


@dataclass
class _Slot:
    """What decoding one batch slot produced: the sample used (None if all failed), its image, and
    the samples that failed on the way [(index, error)]."""

    index: int | None
    image: torch.Tensor | None
    failed: list[tuple[int, str]]


class ImageTextLoader:
    """Infinite iterator of batches dict(images=(B, 3, H, W) float32 in [-1, 1], captions=list[str],
    indices=list[int]) where indices are positions in `manifest.samples`; each batch from one bucket.

    `state_dict()` covers the order (epoch, position, seed) and the bad-row counts; a loader rebuilt
    from the same manifest and config, after `load_state_dict`, yields the batches an uninterrupted
    run would have yielded next.
    """

    def __init__(
        self,
        manifest: Manifest,
        buckets: BucketConfig | None = None,
        schedule: ResolutionSchedule | None = None,
        config: LoaderConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.manifest = manifest
        self.buckets = buckets or BucketConfig()
        self.schedule = schedule or ResolutionSchedule()
        self.config = config or LoaderConfig()
        self._bucket_sizes = {r: self.buckets.buckets(r) for r in self.schedule.resolutions}
        classes = np.array([self.buckets.aspect_class(s.width, s.height) for s in manifest.samples], dtype=np.int64)
        self._members = {int(c): np.flatnonzero(classes == c) for c in np.unique(classes)}
        self.sampler = BucketBatchSampler(
            classes,
            self.config.batch_size,
            seed=self.config.seed,
            rank=rank,
            world_size=world_size,
            remainder=self.config.remainder,
            shuffle=self.config.shuffle,
            schedule=self.schedule,
            batches_per_step=self.config.batches_per_step,
        )
        # Scan-time counts plus decode-time failures, each failing sample counted once.
        self.stats = DataStats(max_logged_per_reason=manifest.stats.max_logged_per_reason, source=manifest.stats.source)
        self.stats.load_state_dict(manifest.stats.state_dict())
        self._undecodable: set[int] = set()
        self._pool = ThreadPoolExecutor(self.config.num_threads) if self.config.num_threads > 0 else None
        self._cursor = (0, 0)  # (epoch, position) of the next batch to submit

    # ---- decoding -------------------------------------------------------------------------------

    def _decode_slot(self, plan: BatchPlan, slot: int) -> _Slot:
        height, width = self._bucket_sizes[plan.resolution][plan.aspect_class]
        index = plan.indices[slot]
        failed: list[tuple[int, str]] = []
        rng: random.Random | None = None
        for attempt in range(self.config.max_substitute_tries + 1):
            if attempt > 0:
                # Substitute drawn by a keyed RNG: the same choice in every run, whatever the threads do.
                rng = rng or random.Random(f"selfe-substitute/{self.sampler.seed}/{plan.step}/{slot}")
                members = self._members[plan.aspect_class]
                index = int(members[rng.randrange(len(members))])
            if index in self._undecodable:
                continue  # known to fail; skipping it yields the same outcome without the decode
            try:
                image = load_for_bucket(self.manifest.samples[index].path, height, width)
            except ImageReadError as err:
                failed.append((index, str(err)))
                continue
            return _Slot(index, image, failed)
        return _Slot(None, None, failed)

    def _submit(self, plan: BatchPlan) -> list[Future | _Slot]:
        if self._pool is None:
            return [self._decode_slot(plan, slot) for slot in range(len(plan.indices))]
        return [self._pool.submit(self._decode_slot, plan, slot) for slot in range(len(plan.indices))]

    def _collect(self, plan: BatchPlan, slots: list[Future | _Slot]) -> dict[str, Any] | None:
        results = [s.result() if isinstance(s, Future) else s for s in slots]
        for result in results:
            for index, error in result.failed:
                if index not in self._undecodable:
                    self._undecodable.add(index)
                    self.stats.skip(UNDECODABLE_IMAGE, self.manifest.samples[index].line, error)
                    self.stats.rows_ok -= 1
        good = [r for r in results if r.index is not None]
        if not good:
            return None
        return {
            "images": torch.stack([r.image for r in good]),
            "captions": [self.manifest.samples[r.index].caption for r in good],
            "indices": [r.index for r in good],
        }

    def _run(self, plans: Iterable[BatchPlan], on_consumed=None) -> Iterator[dict[str, Any]]:
        """Decode `plans` with up to prefetch_batches in flight; yield them in order."""
        pending: deque[tuple[BatchPlan, list[Future | _Slot]]] = deque()
        plans = iter(plans)
        ahead = max(1, self.config.prefetch_batches) if self._pool is not None else 1
        while True:
            while len(pending) < ahead:
                plan = next(plans, None)
                if plan is None:
                    break
                pending.append((plan, self._submit(plan)))
            if not pending:
                return
            plan, slots = pending.popleft()
            batch = self._collect(plan, slots)
            if on_consumed is not None:
                on_consumed(plan)
            if batch is not None:
                yield batch

    # ---- iteration and state ------------------------------------------------------------------

    def _plan_stream(self) -> Iterator[BatchPlan]:
        while True:
            epoch, position = self._cursor
            self._cursor = self.sampler.advance(epoch, position)
            yield self.sampler.plan(epoch, position)

    def _consumed(self, plan: BatchPlan) -> None:
        self.sampler.epoch, self.sampler.position = self.sampler.advance(plan.epoch, plan.position)

    def __iter__(self) -> ImageTextLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if not hasattr(self, "_stream"):
            self._cursor = (self.sampler.epoch, self.sampler.position)
            self._stream = self._run(self._plan_stream(), self._consumed)
        return next(self._stream)

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of one epoch (e.g. validation with shuffle=False); leaves the training state alone."""
        return self._run(self.sampler.iter_epoch(epoch))

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Order (of the next batch not yet returned), seed, counts, and the samples known not to decode."""
        return {
            "sampler": self.sampler.state_dict(),
            "stats": self.stats.state_dict(),
            "undecodable": sorted(self._undecodable),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset_stream()
        self.sampler.load_state_dict(state["sampler"])
        self.stats.load_state_dict(state["stats"])
        self._undecodable = {int(i) for i in state["undecodable"]}

    def _reset_stream(self) -> None:
        stream = self.__dict__.pop("_stream", None)
        if stream is not None:
            stream.close()  # drops the prefetched batches; their futures finish and are discarded

    def close(self) -> None:
        self._reset_stream()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        pool = self.__dict__.get("_pool")
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def cache_mismatch(index: dict[str, Any], manifest: str | Path, buckets: BucketConfig) -> str | None:
    """Why the cache of `index` cannot stand for `manifest`'s images in `buckets`, or None."""
    if index["settings"]["manifest_sha256"] != file_sha256(manifest):
        return "was built from another manifest"
    if tuple(index["aspect_ratios"]) != buckets.aspect_ratios:
        return f"has aspect ratios {index['aspect_ratios']}, the buckets {list(buckets.aspect_ratios)}"
    return None


def open_cache(config: DataConfig, rank: int = 0, world_size: int = 1) -> CachedDataset | None:
    """The training cache of `config.cache_dir` in the loader's order, or None when the folder holds
    no cache yet. A cache of another manifest or other buckets is an error, never used silently."""
    if not config.cache_dir:
        return None
    root = Path(config.cache_dir)
    if not (root / INDEX_NAME).is_file():
        log.warning("no cache in %s (run `selfe cache`); decoding the images of %s", root, config.manifest)
        return None
    if (problem := cache_mismatch(read_index(root), config.manifest, config.buckets)) is not None:
        raise ValueError(f"cache {root} does not fit {config.manifest}: it {problem}")
    loader = config.loader
    return CachedDataset(
        root,
        loader.batch_size,
        seed=loader.seed,
        rank=rank,
        world_size=world_size,
        schedule=config.schedule,
        remainder=loader.remainder,
        shuffle=loader.shuffle,
        batches_per_step=loader.batches_per_step,
        verify=config.cache_verify,
    )


def build_loaders(
    config: DataConfig, rank: int = 0, world_size: int = 1
) -> tuple[ImageTextLoader | CachedDataset, ImageTextLoader | None]:
    """(train loader, validation loader or None). Training batches come from `config.cache_dir` when
    it holds a cache (see `open_cache`), else from decoded images. The validation loader keeps file
    order (no shuffle), pads the last batch of each bucket, and draws resolutions from the same schedule."""
    if not config.manifest:
        raise ValueError("DataConfig.manifest is empty: give the TSV manifest of the training set")
    train = open_cache(config, rank, world_size) or ImageTextLoader(
        scan_manifest(config.manifest, config.base_dir, config.checks),
        config.buckets,
        config.schedule,
        config.loader,
        rank,
        world_size,
    )
    val = None
    if config.val_manifest:
        val_base = config.val_base_dir if config.val_base_dir is not None else config.base_dir
        val_loader_config = LoaderConfig(**{**config.loader.__dict__, "shuffle": False, "remainder": "pad"})
        val = ImageTextLoader(
            scan_manifest(config.val_manifest, val_base, config.checks),
            config.buckets,
            config.schedule,
            val_loader_config,
            rank,
            world_size,
        )
    return train, val
