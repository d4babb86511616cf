"""TSV manifests: scan once, keep the usable rows, count and log the bad ones by reason.

Format (the Self-E release): one sample per line, tab-separated; column 1 the image path (relative
paths resolve against `base_dir`), column 2 the prompt (UTF-8); further columns are ignored. Empty
lines are ignored and not counted; an optional header line is skipped with `has_header=True`.

Cheap checks run at scan time (line format, caption, file existence, image header: size and
format); decoding the pixels happens only in the loader, which counts what fails there into the
same `DataStats` (reason `undecodable_image`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfe.train.data.images import ImageReadError, read_image_size

log = logging.getLogger(__name__)

# Reasons a row is skipped. The first six are found while scanning the manifest, the last while decoding.
MALFORMED_LINE = "malformed_line"  # fewer than 2 tab-separated columns, or an empty path
NON_UTF8_CAPTION = "non_utf8_caption"
EMPTY_CAPTION = "empty_caption"  # empty after stripping whitespace
OVERLONG_CAPTION = "overlong_caption"  # more than max_caption_chars characters
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"  # header cannot be parsed (not an image, wrong format, zero bytes)
TINY_IMAGE = "tiny_image"  # shorter side below min_side
UNDECODABLE_IMAGE = "undecodable_image"  # header fine, pixel data truncated or corrupt (found by the loader)
REASONS = (
    MALFORMED_LINE,
    NON_UTF8_CAPTION,
    EMPTY_CAPTION,
    OVERLONG_CAPTION,
    MISSING_FILE,
    UNREADABLE_IMAGE,
    TINY_IMAGE,
    UNDECODABLE_IMAGE,
)


@dataclass
class ManifestConfig:
    """What counts as a usable row.

    min_side: images whose shorter side (pixels) is below this are skipped.
    max_caption_chars: captions longer than this (characters, after stripping) are skipped.
    has_header: skip the first line.
    check_images: open each image's header at scan time (size for the buckets, tiny and unreadable
        checks); without it width/height are unknown and every sample lands in the square bucket.
    scan_workers: threads that read image headers (I/O-bound; PIL's header parse is short).
    max_logged_per_reason: bad rows logged one by one per reason before going quiet (all are counted).
    """

    min_side: int = 64
    max_caption_chars: int = 2000
    has_header: bool = False
    check_images: bool = True
    scan_workers: int = 8
    max_logged_per_reason: int = 20

    def __post_init__(self) -> None:
        for name in ("min_side", "max_caption_chars", "scan_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ManifestConfig.{name} must be a positive int, got {value!r}")
        if self.max_logged_per_reason < 0:
            raise ValueError(
                f"ManifestConfig.max_logged_per_reason must be >= 0, got {self.max_logged_per_reason}"
            )


@dataclass(frozen=True)
class Sample:
    """One usable row. line: 1-based line number in the manifest; width/height: pixels after EXIF
    orientation (0 when images were not checked at scan time)."""

    path: Path
    caption: str
    line: int
    width: int = 0
    height: int = 0


@dataclass
class DataStats:
    """Counts of rows seen, rows kept and rows skipped per reason. Decode-time failures are counted
    once per sample (the loader remembers which samples failed) so a resumed run counts the same."""

    rows_total: int = 0
    rows_ok: int = 0
    bad: Counter = field(default_factory=Counter)
    max_logged_per_reason: int = 20
    source: str = ""

    def skip(self, reason: str, line: int | None, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {REASONS}")
        self.bad[reason] += 1
        if self.bad[reason] <= self.max_logged_per_reason:
            where = f"{self.source}:{line}" if line is not None else self.source
            log.warning("skipping %s (%s)%s", where, reason, f": {detail}" if detail else "")
            if self.bad[reason] == self.max_logged_per_reason:
                log.warning("further %s rows are counted but not logged", reason)

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def as_dict(self) -> dict[str, int]:
        """Flat counts: rows_total, rows_ok and one entry per reason (zeros included)."""
        return {
            "rows_total": self.rows_total,
            "rows_ok": self.rows_ok,
            **{r: self.bad.get(r, 0) for r in REASONS},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rows_total": self.rows_total, "rows_ok": self.rows_ok, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_total = int(state["rows_total"])
        self.rows_ok = int(state["rows_ok"])
        self.bad = Counter({str(k): int(v) for k, v in state["bad"].items()})

    def summary(self) -> str:
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.bad.items()) if n)
        return f"{self.rows_ok}/{self.rows_total} rows usable" + (f"; skipped: {parts}" if parts else "")


class EmptyManifestError(ValueError):
    """A manifest in which no row is usable."""


@dataclass
class Manifest:
    """The usable samples of one manifest, in file order, and the counts of what was skipped."""

    path: Path
    base_dir: Path
    samples: list[Sample]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class _Row:
    line: int
    path: Path
    caption: str


def _parse_lines(
    lines: Iterable[bytes], base_dir: Path, config: ManifestConfig, stats: DataStats
) -> Iterator[_Row]:
    """The text checks: column count, path, caption encoding/emptiness/length."""
    for number, raw in enumerate(lines, start=1):
        if number == 1 and config.has_header:
            continue
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        stats.rows_total += 1
        columns = raw.split(b"\t")
        if len(columns) < 2 or not columns[0].strip():
            stats.skip(
                MALFORMED_LINE, number, f"{len(columns)} tab-separated column(s), need path<TAB>prompt"
            )
            continue
        try:
            caption = columns[1].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            stats.skip(NON_UTF8_CAPTION, number, str(err))
            continue
        if not caption:
            stats.skip(EMPTY_CAPTION, number)
            continue
        if len(caption) > config.max_caption_chars:
            stats.skip(OVERLONG_CAPTION, number, f"{len(caption)} > {config.max_caption_chars} characters")
            continue
        # Paths keep undecodable bytes (surrogateescape), as the OS does.
        path = Path(os.fsdecode(columns[0].strip()))
        yield _Row(number, path if path.is_absolute() else base_dir / path, caption)


def _check_image(row: _Row, check_images: bool) -> tuple[str | None, str, int, int]:
    """(reason or None, detail, width, height) from the file system and the image header."""
    if not row.path.is_file():
        return MISSING_FILE, str(row.path), 0, 0
    if not check_images:
        return None, "", 0, 0
    try:
        width, height = read_image_size(row.path)
    except ImageReadError as err:
        return UNREADABLE_IMAGE, str(err), 0, 0
    return None, "", width, height


def scan_manifest(
    path: str | os.PathLike, base_dir: str | os.PathLike | None = None, config: ManifestConfig | None = None
) -> Manifest:
    """Read a TSV manifest and keep the usable rows.

    base_dir: where relative image paths resolve (default: the manifest's folder).
    Raises FileNotFoundError for a missing manifest and EmptyManifestError (naming the manifest and
    the counts per reason) when no row is usable.
    """
    config = config or ManifestConfig()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = Path(base_dir) if base_dir is not None else path.parent
    stats = DataStats(max_logged_per_reason=config.max_logged_per_reason, source=str(path))
    with open(path, "rb") as f:
        rows = list(_parse_lines(f, base, config, stats))
    # Header reads are I/O-bound: threads overlap them; map keeps file order.
    workers = min(config.scan_workers, max(1, len(rows)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(lambda r: _check_image(r, config.check_images), rows))
    samples = []
    for row, (reason, detail, width, height) in zip(rows, checks):
        if reason is None and config.check_images and min(width, height) < config.min_side:
            reason, detail = TINY_IMAGE, f"{width}x{height}, shorter side < min_side={config.min_side}"
        if reason is not None:
            stats.skip(reason, row.line, detail)
            continue
        samples.append(Sample(row.path, row.caption, row.line, width, height))
    stats.rows_ok = len(samples)
    if not samples:
        raise EmptyManifestError(f"manifest {path} has no usable row: {stats.summary()}")
    log.info("manifest %s: %s", path, stats.summary())
    return Manifest(path, base, samples, stats)
