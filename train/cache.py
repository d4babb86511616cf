"""Writing the latent/text cache: safetensors shards plus an index, resumable after a kill.

Layout of `out_dir` (read back by selfe.train.data.cached.CachedDataset):
    index.json                    written atomically (temp file + rename) after every finished shard
    null.safetensors              txt (1, Lt', d), txt_mask (1, Lt'), pooled (1, d_pooled): the encoding
                                  of "" (phi), encoded once per cache
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
The command line (`selfe cache`) is in selfe.train.cache_cli.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from selfe.train.data.buckets import BucketConfig
from selfe.train.data.cached import FORMAT, INDEX_NAME, NULL_NAME, TEXT_KEYS, file_sha256
from selfe.train.data.images import ImageReadError, load_for_bucket
from selfe.train.data.manifest import UNDECODABLE_IMAGE, DataStats, ManifestConfig, scan_manifest

log = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
            raise ValueError(f"CacheConfig.resolutions must be non-empty and distinct, got {self.resolutions}")
        for r in self.resolutions:
            self.buckets.buckets(r)  # validates: positive multiple of the bucket multiple
        for name in ("shard_size", "encode_batch_size", "num_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_threads" else 1):
                raise ValueError(f"CacheConfig.{name} must be a positive int, got {value!r}")
        if self.store_dtype is not None and self.store_dtype not in STORE_DTYPES:
            raise ValueError(
                f"CacheConfig.store_dtype must be None or one of {list(STORE_DTYPES)}, got {self.store_dtype!r}"
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


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file through a temp file and a rename (a kill leaves only the *.tmp); its size."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path.stat().st_size


def _cast(tensors: dict[str, torch.Tensor], store_dtype: str | None) -> dict[str, torch.Tensor]:
    if store_dtype is None:
        return tensors
    dtype = STORE_DTYPES[store_dtype]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _trim_text(txt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that are padding and exactly zero in every row (lossless)."""
    used = mask.any(0) | (txt != 0).flatten(2).any(2).any(0)
    nonzero = used.nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return txt[:, :length].contiguous(), mask[:, :length].contiguous()


def _check_text(out: Any, batch: int) -> dict[str, torch.Tensor]:
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
            raise ValueError(f"text_encoder returned different lengths Lt {sorted(lengths)}; pad to a fixed length")
        txt, mask = _trim_text(torch.cat(parts["txt"]), torch.cat(parts["txt_mask"]))
        tensors.update(txt=txt, txt_mask=mask, pooled=torch.cat(parts["pooled"]))
        text_length = lengths.pop()
    return _cast(tensors, config.store_dtype), [samples[i].caption for i in kept], bad, text_length


def _encode_null(text_encoder: TextEncoder, out: Path, config: CacheConfig) -> dict[str, Any]:
    """Encode "" once and store it (phi, the null condition of caption dropout); its index entry."""
    text = _check_text(text_encoder([""]), 1)
    txt, mask = _trim_text(text["txt"], text["txt_mask"])
    tensors = _cast({"txt": txt, "txt_mask": mask, "pooled": text["pooled"]}, config.store_dtype)
    size = _save_atomic(tensors, out / NULL_NAME)
    return {"file": NULL_NAME, "bytes": size, "text_length": text["txt"].shape[1]}


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
        "manifest_sha256": file_sha256(scanned.path),
        "base_dir": str(scanned.base_dir.resolve()),
        **{k: v for k, v in asdict(config).items() if k not in ("num_threads", "encode_batch_size")},
    }
    for knob in ("scan_workers", "max_logged_per_reason"):  # speed and verbosity, not content
        settings["checks"].pop(knob)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    index_path = out / INDEX_NAME
    done: dict[int, dict[str, Any]] = {}
    null: dict[str, Any] | None = None
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
        null_path = out / NULL_NAME
        kept_null = previous.get("null") or {}
        if null_path.is_file() and null_path.stat().st_size == kept_null.get("bytes"):
            null = kept_null
    stale = [*out.glob("shard-*.safetensors.tmp"), out / (NULL_NAME + ".tmp"), out / (INDEX_NAME + ".tmp")]
    for path in stale:
        path.unlink(missing_ok=True)  # a file a kill left half-written

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
        "null": null,
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
            if index["null"] is None:
                index["null"] = _encode_null(text_encoder, out, config)
                _write_json_atomic(index_path, index)
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
                    metadata = {"captions": json.dumps(captions, ensure_ascii=False)}
                    entry["bytes"] = _save_atomic(tensors, out / plan.file, metadata)
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


def cache_main(argv: Sequence[str] | None = None) -> int:
    """`selfe cache ...` (the `selfe` command routes here): see selfe.train.cache_cli."""
    from selfe.train.cache_cli import cache_main as run

    return run(argv)
