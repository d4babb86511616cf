"""Precomputed latents and text states: safetensors shards plus an index, resumable after a kill.

Layout of `out_dir`:
    index.json                    written atomically (temp file + rename) after every finished shard
    shard-000000.safetensors      one bucket (resolution, aspect class) per shard, up to shard_size samples:
        latents  (N, C, H/8, W/8)  the image encoder's output
        indices  (N,) int64        positions in the scanned manifest's usable samples
        txt (N, Lt', d), txt_mask (N, Lt') bool, pooled (N, d_pooled)   shards of the first resolution only
        metadata: captions (JSON list)
Text states do not depend on the resolution, so with several resolutions only the first one's shards
carry them and the reader looks them up by sample index. The tail of the text that is padding in
every row of a shard and exactly zero is not stored (Lt' <= Lt); the reader pads it back with zeros,
so what it returns is bit-identical to what the encoders produced.

Resuming: the shard plan is a pure function of the manifest and the config (fingerprinted in the
index; a different one is an error). Shards listed in the index with their file present and of the
recorded size are kept; every other planned shard, including the one a kill interrupted (left as a
*.tmp file, deleted on restart), is encoded again.

Encoders are two protocols, so this module needs no real model:
    image_encoder(images (B, 3, H, W) float in [-1, 1]) -> latents (B, C, H/8, W/8)
    text_encoder(prompts: list[str]) -> dict(txt=(B, Lt, d), txt_mask=(B, Lt) bool, pooled=(B, d_pooled))
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from selfe.train.data.buckets import BucketConfig
from selfe.train.data.images import ImageReadError, load_for_bucket
from selfe.train.data.manifest import UNDECODABLE_IMAGE, DataStats, ManifestConfig, scan_manifest

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "selfe-cache/1"
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
_STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CacheConfig:
    """resolutions: base resolutions to cache (each sample at each); shard_size: samples per shard;
    encode_batch_size: images / prompts per encoder call; num_threads: image decode threads;
    store_dtype: cast floating tensors to this before saving (None keeps the encoders' dtype);
    encoder_tag: names the encoders in the fingerprint, so a resume with other encoders is refused."""

    resolutions: tuple[int, ...] = (256,)
    shard_size: int = 1024
    encode_batch_size: int = 16
    num_threads: int = 4
    store_dtype: str | None = None
    encoder_tag: str = ""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    checks: ManifestConfig = field(default_factory=ManifestConfig)

    def __post_init__(self) -> None:
        self.resolutions = tuple(int(r) for r in self.resolutions)
        if not self.resolutions or len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(
                f"CacheConfig.resolutions must be non-empty and distinct, got {self.resolutions}"
            )
        for r in self.resolutions:
            self.buckets.buckets(r)  # validates: positive multiple of the bucket multiple
        for name in ("shard_size", "encode_batch_size", "num_threads"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "num_threads" else 1)
            ):
                raise ValueError(f"CacheConfig.{name} must be a positive int, got {value!r}")
        if self.store_dtype is not None and self.store_dtype not in _STORE_DTYPES:
            raise ValueError(
                f"CacheConfig.store_dtype must be None or one of {list(_STORE_DTYPES)}, "
                f"got {self.store_dtype!r}"
            )


@dataclass(frozen=True)
class ShardPlan:
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _trim_text(txt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding and exactly zero in every row (lossless)."""
    used = mask.any(0) | (txt != 0).flatten(2).any(2).any(0)
    nonzero = used.nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return txt[:, :length].contiguous(), mask[:, :length].contiguous()


def _check_text(out: Any, batch: int) -> dict[str, torch.Tensor]:
    if not isinstance(out, dict) or not {"txt", "txt_mask", "pooled"} <= set(out):
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


def _encode_shard(
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

    # All decodes of the shard are queued at once, so decoding runs ahead of the encoder.
    images = pool.map(safe_load, plan.indices) if pool is not None else map(safe_load, plan.indices)
    kept: list[int] = []
    bad: list[int] = []
    parts: dict[str, list[torch.Tensor]] = {"latents": [], "txt": [], "txt_mask": [], "pooled": []}
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([img for _, img in pending]).to(device)
        latents = image_encoder(batch)
        h, w = plan.height // 8, plan.width // 8
        if latents.ndim != 4 or latents.shape[0] != len(pending) or tuple(latents.shape[2:]) != (h, w):
            raise ValueError(
                f"image_encoder returned {tuple(latents.shape)} for images {tuple(batch.shape)}; "
                f"expected (B, C, {h}, {w})"
            )
        parts["latents"].append(latents.detach().cpu())
        if plan.has_text:
            text = _check_text(text_encoder([samples[i].caption for i, _ in pending]), len(pending))
            for key in ("txt", "txt_mask", "pooled"):
                parts[key].append(text[key])
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
        lengths = {t.shape[1] for t in parts["txt"]}
        if len(lengths) != 1:
            raise ValueError(
                f"text_encoder returned different lengths Lt {sorted(lengths)}; pad to a fixed length"
            )
        txt, mask = _trim_text(torch.cat(parts["txt"]), torch.cat(parts["txt_mask"]))
        tensors.update(txt=txt, txt_mask=mask, pooled=torch.cat(parts["pooled"]))
        text_length = lengths.pop()
    if config.store_dtype is not None:
        dtype = _STORE_DTYPES[config.store_dtype]
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, [samples[i].caption for i in kept], bad, text_length


def build_cache(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    config: CacheConfig | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_new_shards: int | None = None,
) -> dict[str, Any]:
    """Encode every usable sample of `manifest` at each configured resolution into `out_dir`.

    Resumes a cache that a kill interrupted. max_new_shards: stop after writing that many shards
    (a job split into pieces; the tests' stand-in for a kill). Returns the index (also index.json);
    index["complete"] tells whether every planned shard is written.
    """
    config = config or CacheConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    scanned = scan_manifest(manifest, base_dir, config.checks)
    classes = [config.buckets.aspect_class(s.width, s.height) for s in scanned.samples]
    plans = plan_shards(classes, config)
    settings = {
        "manifest_sha256": _file_sha256(scanned.path),
        "base_dir": str(scanned.base_dir.resolve()),
        **{k: v for k, v in asdict(config).items() if k not in ("num_threads", "encode_batch_size")},
    }
    for knob in ("scan_workers", "max_logged_per_reason"):  # speed and verbosity, not content
        settings["checks"].pop(knob)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    index_path = out / INDEX_NAME
    done: dict[int, dict[str, Any]] = {}
    if index_path.exists():
        previous = json.loads(index_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds a cache built from another manifest or config ({index_path}); "
                "use a new --out folder or delete the old cache"
            )
        for entry in previous["shards"]:
            path = out / entry["file"] if entry["file"] else None
            if path is None or (path.is_file() and path.stat().st_size == entry["bytes"]):
                done[entry["id"]] = entry
    for stale in [*out.glob("shard-*.safetensors.tmp"), out / (INDEX_NAME + ".tmp")]:
        stale.unlink(missing_ok=True)  # a shard or index a kill left half-written

    index: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "settings": settings,
        "manifest": str(scanned.path),
        "resolutions": list(config.resolutions),
        "aspect_ratios": list(config.buckets.aspect_ratios),
        "num_samples": len(scanned.samples),
        "scan_stats": scanned.stats.state_dict(),
        "total_shards": len(plans),
        "shards": [done[p.id] for p in plans if p.id in done],
        "complete": False,
    }
    stats = DataStats(max_logged_per_reason=config.checks.max_logged_per_reason, source=str(scanned.path))
    total = sum(len(p.indices) for p in plans)
    written = 0
    pool = ThreadPoolExecutor(config.num_threads) if config.num_threads > 0 else None
    bar = tqdm(
        total=total,
        initial=sum(len(p.indices) for p in plans if p.id in done),
        unit="img",
        desc="cache",
        disable=not progress,
        smoothing=0.1,
    )
    try:
        with torch.inference_mode():
            for plan in plans:
                if plan.id in done:
                    continue
                if max_new_shards is not None and written >= max_new_shards:
                    break
                tensors, captions, bad, text_length = _encode_shard(
                    plan, scanned.samples, image_encoder, text_encoder, config, device, pool, stats, bar
                )
                entry = {
                    "id": plan.id,
                    "file": plan.file if tensors else None,
                    "resolution": plan.resolution,
                    "aspect_class": plan.aspect_class,
                    "height": plan.height,
                    "width": plan.width,
                    "num": len(captions),
                    "has_text": plan.has_text,
                    "undecodable": bad,
                    "bytes": 0,
                    "text_length": text_length,
                }
                if tensors:
                    tmp = out / (plan.file + ".tmp")
                    save_file(
                        tensors, str(tmp), metadata={"captions": json.dumps(captions, ensure_ascii=False)}
                    )
                    os.replace(tmp, out / plan.file)
                    entry["bytes"] = (out / plan.file).stat().st_size
                index["shards"].append(entry)
                index["shards"].sort(key=lambda e: e["id"])
                written += 1
                _write_json_atomic(index_path, index)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    index["complete"] = len(index["shards"]) == len(plans)
    # Counts over all runs that built this cache: the scan's plus every undecodable sample once.
    undecodable = len({i for e in index["shards"] for i in e["undecodable"]})
    counts = scanned.stats.as_dict()
    counts[UNDECODABLE_IMAGE] = undecodable
    counts["rows_ok"] = len(scanned.samples) - undecodable
    index["stats"] = counts
    _write_json_atomic(index_path, index)
    log.info("cache %s: %d/%d shards written; %s", out, len(index["shards"]), len(plans), counts)
    return index


# ----------------------------------------------------------------------------------------------
# Reader


class CachedDataset:
    """Batches from a cache: dict(latents=(B, C, h, w), txt=(B, Lt, d), txt_mask=(B, Lt) bool,
    pooled=(B, d_pooled), captions=list[str], indices=list[int]), each batch from one bucket, in the
    deterministic resumable order of BucketBatchSampler (state_dict / load_state_dict).

    schedule: which cached resolution each batch uses (default: the cache's first resolution); every
    resolution it can draw must be in the cache. Samples missing from any of them are left out.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        batch_size: int = 32,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        schedule: Any = None,
        remainder: str = "drop",
        shuffle: bool = True,
        batches_per_step: int = 1,
        allow_incomplete: bool = False,
        open_shards: int = 32,
    ):
        from selfe.train.data.buckets import ResolutionSchedule
        from selfe.train.data.sampler import BucketBatchSampler

        self.root = Path(out_dir)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a cache: {INDEX_NAME} is missing (run `selfe cache` first)"
            )
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise ValueError(
                f"{index_path}: unknown cache format {self.index.get('format')!r}, expected {FORMAT!r}"
            )
        if not self.index["complete"] and not allow_incomplete:
            raise ValueError(
                f"cache {self.root} is incomplete "
                f"({len(self.index['shards'])}/{self.index['total_shards']} shards); "
                "run build_cache again to finish it, or pass allow_incomplete=True"
            )
        cached = self.index["resolutions"]
        self.schedule = schedule or ResolutionSchedule.fixed(cached[0])
        missing = [r for r in self.schedule.resolutions if r not in cached]
        if missing:
            raise ValueError(
                f"schedule draws resolutions {missing} that cache {self.root} lacks (it has {cached})"
            )
        self._entries = {e["id"]: e for e in self.index["shards"] if e["file"]}
        self.text_length = max((e["text_length"] for e in self._entries.values() if e["has_text"]), default=0)
        self._open_shards = open_shards
        self._handles: dict[int, Any] = {}
        self._captions: dict[int, list[str]] = {}
        # (resolution, sample index) -> (shard id, row); sample index -> text (shard id, row)
        self._where: dict[tuple[int, int], tuple[int, int]] = {}
        self._text_at: dict[int, tuple[int, int]] = {}
        classes: dict[int, int] = {}
        for sid, entry in self._entries.items():
            indices = self._handle(sid).get_tensor("indices").tolist()
            for row, i in enumerate(indices):
                self._where[(entry["resolution"], i)] = (sid, row)
                classes[i] = entry["aspect_class"]
                if entry["has_text"]:
                    self._text_at[i] = (sid, row)
        wanted = self.schedule.resolutions
        self.sample_indices = sorted(
            i for i in classes if i in self._text_at and all((r, i) in self._where for r in wanted)
        )
        if not self.sample_indices:
            raise ValueError(
                f"cache {self.root} holds no sample at every resolution of the schedule {wanted}"
            )
        self.sampler = BucketBatchSampler(
            [classes[i] for i in self.sample_indices],
            batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            remainder=remainder,
            shuffle=shuffle,
            schedule=self.schedule,
            batches_per_step=batches_per_step,
        )

    def __len__(self) -> int:
        return len(self.sample_indices)

    def _handle(self, sid: int) -> Any:
        handle = self._handles.pop(sid, None)
        if handle is None:
            handle = safe_open(str(self.root / self._entries[sid]["file"]), framework="pt")
            if len(self._handles) >= self._open_shards:
                self._handles.pop(next(iter(self._handles)))
        self._handles[sid] = handle  # most recently used last
        return handle

    def _row(self, sid: int, name: str, row: int) -> torch.Tensor:
        return self._handle(sid).get_slice(name)[row : row + 1]

    def _caption(self, sid: int, row: int) -> str:
        if sid not in self._captions:
            self._captions[sid] = json.loads(self._handle(sid).metadata()["captions"])
        return self._captions[sid][row]

    def get(self, index: int, resolution: int | None = None) -> dict[str, Any]:
        """One sample by its manifest sample index: dict(latents (1, C, h, w), txt (1, Lt, d),
        txt_mask (1, Lt), pooled (1, d_pooled), caption)."""
        resolution = resolution or self.index["resolutions"][0]
        if (resolution, index) not in self._where or index not in self._text_at:
            raise KeyError(f"sample {index} at resolution {resolution} is not in cache {self.root}")
        sid, row = self._where[(resolution, index)]
        tsid, trow = self._text_at[index]
        txt, mask = self._row(tsid, "txt", trow), self._row(tsid, "txt_mask", trow)
        pad = self.text_length - txt.shape[1]
        if pad:  # the zero padding the writer did not store
            txt = torch.cat([txt, txt.new_zeros(1, pad, txt.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(1, pad)], 1)
        return {
            "latents": self._row(sid, "latents", row),
            "txt": txt,
            "txt_mask": mask,
            "pooled": self._row(tsid, "pooled", trow),
            "caption": self._caption(tsid, trow),
        }

    def batch(self, plan: Any) -> dict[str, Any]:
        """The batch of a BatchPlan (positions into sample_indices)."""
        indices = [self.sample_indices[p] for p in plan.indices]
        items = [self.get(i, plan.resolution) for i in indices]
        out: dict[str, Any] = {
            k: torch.cat([it[k] for it in items]) for k in ("latents", "txt", "txt_mask", "pooled")
        }
        out["captions"] = [it["caption"] for it in items]
        out["indices"] = indices
        return out

    def __iter__(self) -> CachedDataset:
        return self

    def __next__(self) -> dict[str, Any]:
        return self.batch(next(self.sampler))

    def iter_epoch(self, epoch: int = 0):
        """The batches of one epoch; leaves the iterator state alone."""
        return (self.batch(plan) for plan in self.sampler.iter_epoch(epoch))

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "fingerprint": self.index["fingerprint"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.index["fingerprint"]:
            raise ValueError(f"the saved data state belongs to another cache than {self.root}")
        self.sampler.load_state_dict(state["sampler"])


# ----------------------------------------------------------------------------------------------
# Smoke-only stand-in encoders (random init; for checking the pipeline, never for training)


class SmokeImageEncoder:
    """SMOKE ONLY: a fixed random 8x8 stride-8 convolution, (B, 3, H, W) -> (B, channels, H/8, W/8)."""

    def __init__(self, channels: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, 3, 8, 8, generator=generator) / (3 * 64) ** 0.5

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(images.float(), self.weight.to(images.device), stride=8)


class SmokeTextEncoder:
    """SMOKE ONLY: words hashed (blake2b, stable across runs) into a fixed random embedding table.

    txt (B, max_length, dim) zero at padding, txt_mask (B, max_length), pooled (B, pooled_dim) = a
    fixed projection of the mean word embedding.
    """

    def __init__(
        self, dim: int = 64, pooled_dim: int = 32, max_length: int = 32, vocab: int = 4096, seed: int = 0
    ):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, dim, generator=generator)
        self.proj = torch.randn(dim, pooled_dim, generator=generator) / dim**0.5
        self.max_length = max_length

    def _token(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(self.table)

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        b, length = len(prompts), self.max_length
        txt = torch.zeros(b, length, self.table.shape[1])
        mask = torch.zeros(b, length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens = [self._token(w) for w in prompt.lower().split()][:length]
            if tokens:
                txt[row, : len(tokens)] = self.table[tokens]
                mask[row, : len(tokens)] = True
        count = mask.sum(1, keepdim=True).clamp(min=1)
        return {"txt": txt, "txt_mask": mask, "pooled": (txt.sum(1) / count) @ self.proj}


# ----------------------------------------------------------------------------------------------
# CLI: selfe cache


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfe cache", description="Precompute latents and text states into shards."
    )
    p.add_argument("--manifest", required=True, help="TSV manifest: image path<TAB>prompt")
    p.add_argument(
        "--base-dir", default=None, help="where relative image paths resolve (default: the manifest's folder)"
    )
    p.add_argument("--out", required=True, help="output folder (resumes a cache already there)")
    p.add_argument("--resolution", type=int, nargs="+", default=[256], help="base resolution(s) to cache")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=16, help="images / prompts per encoder call")
    p.add_argument("--num-threads", type=int, default=4, help="image decode threads")
    p.add_argument(
        "--min-side", type=int, default=ManifestConfig.min_side, help="skip images with a shorter side"
    )
    p.add_argument("--max-caption-chars", type=int, default=ManifestConfig.max_caption_chars)
    p.add_argument("--store-dtype", choices=sorted(_STORE_DTYPES), default=None, help="default: as encoded")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", default=None, help="encoder dtype (bf16, fp16, fp32); default bf16 on cuda, fp32 on cpu"
    )
    p.add_argument("--t5-max-length", type=int, default=512)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ae", help="FLUX.1 autoencoder weights (safetensors)")
    p.add_argument("--t5", help="local T5 encoder snapshot folder")
    p.add_argument("--clip", help="local CLIP text encoder snapshot folder")
    p.add_argument(
        "--smoke", action="store_true", help="random-init tiny stand-in encoders (pipeline check only)"
    )
    return p


def cache_main(argv: Sequence[str] | None = None) -> int:
    """`selfe cache ...`: build (or resume) a cache; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    real = [args.ae, args.t5, args.clip]
    if args.smoke == any(real) or (not args.smoke and not all(real)):
        parser.error("give either --smoke or all of --ae, --t5 and --clip")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        image_encoder: ImageEncoder = SmokeImageEncoder()
        text_encoder: TextEncoder = SmokeTextEncoder()
        tag = "smoke"
    else:
        # Imported here: the real models need transformers and weights, the smoke path neither.
        from selfe.autoencoder import load_autoencoder
        from selfe.text_encoders import TextEncoders, resolve_dtype

        dtype = resolve_dtype(args.dtype, device)
        autoencoder = load_autoencoder(args.ae, device=device, dtype=dtype)
        image_encoder = autoencoder.encode
        encoders = TextEncoders.from_snapshots(
            args.t5, args.clip, t5_max_length=args.t5_max_length, device=device, dtype=dtype
        )
        text_encoder = encoders.encode
        paths = ";".join(
            f"{k}={Path(v).resolve()}" for k, v in (("ae", args.ae), ("t5", args.t5), ("clip", args.clip))
        )
        tag = f"{paths};t5_max_length={args.t5_max_length}"
    config = CacheConfig(
        resolutions=tuple(args.resolution),
        shard_size=args.shard_size,
        encode_batch_size=args.batch_size,
        num_threads=args.num_threads,
        store_dtype=args.store_dtype,
        encoder_tag=tag,
        checks=ManifestConfig(min_side=args.min_side, max_caption_chars=args.max_caption_chars),
    )
    start = time.perf_counter()
    index = build_cache(
        args.manifest,
        args.out,
        image_encoder,
        text_encoder,
        config,
        base_dir=args.base_dir,
        device=device,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(
        f"cache {args.out}: {len(index['shards'])}/{index['total_shards']} shards in {seconds:.1f} s; "
        f"{index['stats']}"
    )
    return 0 if index["complete"] else 1
