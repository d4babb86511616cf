"""Reading a latent/text cache written by `selfe cache` (selfe.train.cache.build_cache).

The layout (index.json, shard-*.safetensors, null.safetensors) is described in selfe.train.cache.
Batches come in the deterministic, resumable order of BucketBatchSampler, so a run that trains from
the cache sees the same samples in the same buckets as one that decodes the images.

Integrity: the index records each file's size and SHA-256. A file whose header cannot be read (truncated,
say) is an error naming it when opened; with `verify` (the default) each file's size and checksum are also
checked once per process, when its first row is read (one extra sequential read of every file a run
touches), so a corrupted shard of the right size is named instead of trained on. A cache written before
checksums were recorded is checked by size only, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from selfe.train.data.buckets import ResolutionSchedule
from selfe.train.data.sampler import BatchPlan, BucketBatchSampler

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
NULL_NAME = "null.safetensors"
FORMAT = "selfe-cache/1"
TEXT_KEYS = ("txt", "txt_mask", "pooled")
REBUILD = "run `selfe cache` again with the same arguments: it encodes the files that fail this check anew"


class DamagedCacheError(ValueError):
    """A file of a cache that cannot be read, or whose size or checksum differs from the index's."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}; {REBUILD}")
        self.problem = problem  # without the advice (the cache builder, which acts on it, logs this)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (the manifest's identity in a cache's fingerprint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(paths: Iterable[str | os.PathLike]) -> str:
    """16 hex digits of SHA-256 over the contents of `paths`, in order; a folder stands for every file under it
    (sorted, hidden ones skipped: a hub download's .cache). It names what a snapshot is, not where it lives:
    moving it keeps the digest, changing a weight does not (a cache's fingerprint of its encoders)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            under = (p for p in path.rglob("*") if p.is_file())
            files += sorted(p for p in under if not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder to fingerprint")
    return hashlib.sha256(b"".join(file_sha256(f).encode() for f in files)).hexdigest()[:16]


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    """The index of the cache in `root`, or FileNotFoundError / ValueError naming what is wrong."""
    index_path = Path(root) / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{Path(root)} is not a cache: {INDEX_NAME} is missing (run `selfe cache` first)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: unknown cache format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def check_file(path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """A DamagedCacheError naming `path` unless its size and SHA-256 are those of its index `entry` (an
    entry from before checksums were recorded has none: its size alone is checked)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DamagedCacheError(f"cache file {path} is missing") from None
    if size != entry["bytes"]:
        raise DamagedCacheError(f"cache file {path} is damaged: {size} bytes, the index says {entry['bytes']}")
    if "sha256" in entry and (digest := file_sha256(path)) != entry["sha256"]:
        raise DamagedCacheError(
            f"cache file {path} is damaged: its SHA-256 is {digest[:16]}..., the index says {entry['sha256'][:16]}..."
        )


def open_file(path: str | os.PathLike) -> Any:
    """safe_open, with a file whose header cannot be read (truncated, garbled) named in the error."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise DamagedCacheError(f"cache file {path} cannot be read ({err})") from None


def pad_text(txt: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the zero states / False mask the writer trimmed: txt (B, L', d) -> (B, length, d)."""
    pad = length - txt.shape[1]
    if pad > 0:
        txt = torch.cat([txt, txt.new_zeros(txt.shape[0], pad, txt.shape[2])], 1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1)
    return txt, mask


class CachedDataset:
    """Batches from a cache: dict(latents=(B, C, h, w), txt=(B, Lt, d), txt_mask=(B, Lt) bool,
    pooled=(B, d_pooled), captions=list[str], indices=list[int]), each batch from one bucket, in the
    deterministic resumable order of BucketBatchSampler (state_dict / load_state_dict). `indices` are
    positions in the scanned manifest's usable samples, as in ImageTextLoader.

    schedule: which cached resolution each batch uses (default: the cache's first resolution); every
    resolution it can draw must be in the cache. Samples missing from any of them are left out.
    open_shards: shard files kept open at once (least recently used closed first).
    verify: check each file's size and checksum against the index when its first row is read (see the
    module docstring).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        batch_size: int = 32,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        schedule: ResolutionSchedule | None = None,
        remainder: str = "drop",
        shuffle: bool = True,
        batches_per_step: int = 1,
        allow_incomplete: bool = False,
        open_shards: int = 32,
        verify: bool = True,
    ):
        self.root = Path(out_dir)
        self.index = read_index(self.root)
        if not self.index["complete"] and not allow_incomplete:
            raise ValueError(
                f"cache {self.root} is incomplete "
                f"({len(self.index['shards'])}/{self.index['total_shards']} shards); "
                "run `selfe cache` again to finish it, or pass allow_incomplete=True"
            )
        cached = self.index["resolutions"]
        self.schedule = schedule or ResolutionSchedule.fixed(cached[0])
        missing = [r for r in self.schedule.resolutions if r not in cached]
        if missing:
            raise ValueError(f"schedule draws resolutions {missing} that cache {self.root} lacks (it has {cached})")
        self._entries = {e["id"]: e for e in self.index["shards"] if e["file"]}
        self.verify = verify
        self._checked: set[int | None] = set()  # shard ids, None for the null file
        unsummed = [e["file"] for e in self._entries.values() if "sha256" not in e]
        if verify and unsummed:
            log.warning(
                "cache %s: %d of its %d shards have no checksum (written before checksums were recorded): they are "
                "checked by size only; build the cache into a new folder for content checks",
                self.root, len(unsummed), len(self._entries),
            )  # fmt: skip
        self.text_length = max((e["text_length"] for e in self._entries.values() if e["has_text"]), default=0)
        self._open_shards = max(1, open_shards)
        self._handles: dict[int, Any] = {}
        self._captions: dict[int, list[str]] = {}
        self._null: dict[str, torch.Tensor] | None = None
        # (resolution, sample index) -> (shard id, row); sample index -> text (shard id, row)
        self._where: dict[tuple[int, int], tuple[int, int]] = {}
        self._text_at: dict[int, tuple[int, int]] = {}
        classes: dict[int, int] = {}
        for sid, entry in self._entries.items():
            for row, i in enumerate(self._handle(sid).get_tensor("indices").tolist()):
                self._where[(entry["resolution"], i)] = (sid, row)
                classes[i] = entry["aspect_class"]
                if entry["has_text"]:
                    self._text_at[i] = (sid, row)
        wanted = self.schedule.resolutions
        self.sample_indices = sorted(
            i for i in classes if i in self._text_at and all((r, i) in self._where for r in wanted)
        )
        if not self.sample_indices:
            raise ValueError(f"cache {self.root} holds no sample at every resolution of the schedule {wanted}")
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

    def widths(self) -> dict[str, int]:
        """{"latent_channels": C, "txt_dim": d, "pooled_dim": d_pooled} of the stored tensors, read from the
        safetensors headers (the index does not record them): what the model must take."""
        with open_file(self.root / self.index["null"]["file"]) as f:
            txt, pooled = f.get_slice("txt").get_shape(), f.get_slice("pooled").get_shape()
        latents = self._handle(next(iter(self._entries))).get_slice("latents").get_shape()
        return {"latent_channels": latents[1], "txt_dim": txt[-1], "pooled_dim": pooled[-1]}

    def _handle(self, sid: int) -> Any:
        handle = self._handles.pop(sid, None)
        if handle is None:
            handle = open_file(self.root / self._entries[sid]["file"])
            if len(self._handles) >= self._open_shards:
                self._handles.pop(next(iter(self._handles)))
        self._handles[sid] = handle  # most recently used last
        return handle

    def _check(self, sid: int | None) -> None:
        """Size and checksum of shard `sid` (None: the null file), once, before its first row is used."""
        if self.verify and sid not in self._checked:
            entry = self.index["null"] if sid is None else self._entries[sid]
            check_file(self.root / entry["file"], entry)
            self._checked.add(sid)

    def _row(self, sid: int, name: str, row: int) -> torch.Tensor:
        self._check(sid)
        return self._handle(sid).get_slice(name)[row : row + 1]

    def _caption(self, sid: int, row: int) -> str:
        if sid not in self._captions:
            self._check(sid)
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
        txt, mask = pad_text(self._row(tsid, "txt", trow), self._row(tsid, "txt_mask", trow), self.text_length)
        return {
            "latents": self._row(sid, "latents", row),
            "txt": txt,
            "txt_mask": mask,
            "pooled": self._row(tsid, "pooled", trow),
            "caption": self._caption(tsid, trow),
        }

    def null_condition(self, batch: int) -> dict[str, torch.Tensor]:
        """phi, the encoding of "" stored once by the writer, as dict(txt (batch, Lt, d), txt_mask
        (batch, Lt), pooled (batch, d_pooled)); expanded views of one row, do not write into them."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if self._null is None:
            self._check(None)
            with open_file(self.root / self.index["null"]["file"]) as f:
                stored = {k: f.get_tensor(k) for k in TEXT_KEYS}
            txt, mask = pad_text(stored["txt"], stored["txt_mask"], self.text_length)
            self._null = {"txt": txt, "txt_mask": mask, "pooled": stored["pooled"]}
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._null.items()}

    def batch(self, plan: BatchPlan) -> dict[str, Any]:
        """The batch of a BatchPlan (positions into sample_indices)."""
        indices = [self.sample_indices[p] for p in plan.indices]
        items = [self.get(i, plan.resolution) for i in indices]
        out: dict[str, Any] = {k: torch.cat([it[k] for it in items]) for k in ("latents", *TEXT_KEYS)}
        out["captions"] = [it["caption"] for it in items]
        out["indices"] = indices
        return out

    def __iter__(self) -> CachedDataset:
        return self

    def __next__(self) -> dict[str, Any]:
        return self.batch(next(self.sampler))

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, Any]]:
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

    def close(self) -> None:
        self._handles.clear()
