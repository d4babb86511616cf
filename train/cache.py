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
recorded size and SHA-256 (`bytes`, `sha256` of each entry; a cache written before checksums has sizes
only) are kept; every other planned shard, including the one a kill interrupted (left as a *.tmp file,
deleted on restart) and a damaged one (logged by name), is encoded again.

The encoders (protocols, see selfe.train.cache_shards) and the per-shard encoding are in
selfe.train.cache_shards; the command line (`selfe cache`) is in selfe.train.cache_cli.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from selfe.train.cache_shards import (
    CacheConfig,
    ImageEncoder,
    TextEncoder,
    cast_floats,
    check_text,
    encode_shard,
    plan_shards,
    trim_text,
)
from selfe.train.data.cached import FORMAT, INDEX_NAME, NULL_NAME, DamagedCacheError, check_file, file_sha256
from selfe.train.data.manifest import UNDECODABLE_IMAGE, DataStats, scan_manifest
from selfe.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)


class CacheMismatchError(ValueError):
    """The output folder holds a cache of another manifest, config or encoders."""


def _save_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write a safetensors file through a temp file and a rename (a kill leaves only the *.tmp); its size
    and SHA-256, for the index (read back from the file: what a reader will check)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": digest}


def _intact(path: Path, entry: dict[str, Any]) -> bool:
    """Whether a file of an earlier run is there as its index entry records it (else logged, and redone)."""
    try:
        check_file(path, entry)
    except DamagedCacheError as err:
        log.warning("%s; encoding it again", err.problem)
        return False
    return True


def _encode_null(text_encoder: TextEncoder, out: Path, config: CacheConfig) -> dict[str, Any]:
    """Encode "" once and store it (phi, the null condition of caption dropout); its index entry."""
    text = check_text(text_encoder([""]), 1)
    txt, mask = trim_text(text["txt"], text["txt_mask"])
    tensors = cast_floats({"txt": txt, "txt_mask": mask, "pooled": text["pooled"]}, config.store_dtype)
    return {"file": NULL_NAME, **_save_atomic(tensors, out / NULL_NAME), "text_length": text["txt"].shape[1]}


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


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
    device = torch.device(device)
    scanned = scan_manifest(manifest, base_dir, config.checks)
    out.mkdir(parents=True, exist_ok=True)  # after the scan: a bad manifest leaves no empty folder behind
    classes = [config.buckets.aspect_class(s.width, s.height) for s in scanned.samples]
    plans = plan_shards(classes, config)
    settings = {
        "manifest_sha256": file_sha256(scanned.path),
        # Where the images lie seen from the cache, so a data folder moved whole (images, manifest and
        # cache together) still resumes; the images' content is not hashed, only the manifest's.
        "base_dir": os.path.relpath(scanned.base_dir.resolve(), out.resolve()),
        **{k: v for k, v in asdict(config).items() if k not in ("num_threads", "encode_batch_size")},
    }
    for knob in ("scan_workers", "max_logged_per_reason"):  # speed and verbosity, not content
        settings["checks"].pop(knob)
    fingerprint = _fingerprint(settings)
    # Caches made before base_dir was stored relative hold the absolute folder: the same images, so resume them.
    legacy_fingerprint = _fingerprint({**settings, "base_dir": str(scanned.base_dir.resolve())})

    index_path = out / INDEX_NAME
    done: dict[int, dict[str, Any]] = {}
    null: dict[str, Any] | None = None
    if index_path.exists():
        try:
            previous = json.loads(index_path.read_text(encoding="utf-8"))
            if not isinstance(previous, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8, or not an object
            raise CacheMismatchError(
                f"{index_path} is not a readable cache index ({err}); use a new --out folder or delete it"
            ) from err
        if previous.get("fingerprint") not in (fingerprint, legacy_fingerprint):
            before = json.loads(json.dumps(previous.get("settings", {}), default=str))
            now = json.loads(json.dumps(settings, default=str))
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise CacheMismatchError(
                f"{out} holds a cache built from another manifest or config ({index_path}; differs in: "
                f"{', '.join(changed) or 'its fingerprint'}); use a new --out folder or delete the old cache"
            )
        for entry in previous["shards"]:
            if entry["file"] is None or _intact(out / entry["file"], entry):
                done[entry["id"]] = entry
        if (kept_null := previous.get("null")) and _intact(out / NULL_NAME, kept_null):
            null = kept_null
        if unsummed := [e["file"] for e in done.values() if e["file"] and "sha256" not in e]:
            log.warning(
                "%s: %d shards from before checksums were recorded, kept by their size; build into a new folder "
                "to have every shard checksummed", out, len(unsummed),
            )  # fmt: skip
    # shard and null files: NAME.tmp; the index: .index.json.XXXX.tmp (selfe.utils.atomic)
    stale = [*out.glob("shard-*.safetensors.tmp"), out / (NULL_NAME + ".tmp"), *out.glob(f".{INDEX_NAME}.*.tmp")]
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
                atomic_write_json(index_path, index)
            for plan in plans:
                if plan.id in done:
                    continue
                if max_new_shards is not None and written >= max_new_shards:
                    break
                tensors, captions, bad, text_length = encode_shard(
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
                    entry.update(_save_atomic(tensors, out / plan.file, metadata))
                index["shards"].append(entry)
                index["shards"].sort(key=lambda e: e["id"])
                written += 1
                atomic_write_json(index_path, index)
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
    atomic_write_json(index_path, index)
    log.info("cache %s: %d/%d shards written; %s", out, len(index["shards"]), len(plans), counts)
    return index
