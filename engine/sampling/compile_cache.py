"""torch.compile's work kept on disk, so a fresh process starts without compiling again.

A library user pays torch.compile once per process and shape (tens of seconds for a 2b step on a GPU).
`SelfEPipeline.warmup` saves what the process compiled so far with torch's portable "mega-cache"
(`torch.compiler.save_cache_artifacts`: inductor's compiled graphs with their kernels, AOTAutograd's
entries, autotuning results), and a fresh process loads every saved file (`load_cache_artifacts`) before
its first compile. Dynamo still traces, but inductor's lowering, code generation and (on a GPU) kernel
builds are skipped: counters["inductor"]["fxgraph_cache_hit"] instead of "fxgraph_cache_miss".

Layout: FOLDER/torch-<torch version>/<key>.bin with <key>.json beside it saying what was warmed. FOLDER is
FastPathConfig.compile_cache_dir, else $SELFE_COMPILE_CACHE, else ~/.cache/selfe/compile. The key hashes the
warmed shape set (resolutions, text buckets, batches, dtype, device), so warm-ups of other shape sets keep
their own files; torch only uses an entry whose own key (the graph, the device, the torch build) matches,
so a file from another machine is ignored, not misused.

Trust: torch reads these entries back with pickle, as it does its own inductor cache. So the folder must be
trusted like code: it is made 0700, and a folder or file that another user owns or can write is refused
(PermissionError), never loaded. Files are written whole (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfe.utils.atomic import atomic_write_bytes, atomic_write_json

COMPILE_CACHE_ENV = "SELFE_COMPILE_CACHE"
ARTIFACTS_SUFFIX = ".bin"

_loaded: set[Path] = set()  # artifact files this process loaded already (torch's caches are process-wide)
_lock = threading.Lock()


def compile_cache_root(folder: str | os.PathLike | None = None) -> Path:
    """`folder`, else $SELFE_COMPILE_CACHE, else ~/.cache/selfe/compile (not yet versioned)."""
    if folder is None:
        folder = os.environ.get(COMPILE_CACHE_ENV) or Path.home() / ".cache" / "selfe" / "compile"
    return Path(folder).expanduser()


def versioned_folder(root: Path) -> Path:
    """root/torch-<version>: artifacts of one torch build never meet another's."""
    version = "".join(c if c.isalnum() or c in ".-_" else "_" for c in torch.__version__)
    return root / f"torch-{version}"


def untrusted_reason(path: Path) -> str | None:
    """Why `path` must not be loaded from (owned by another user, or writable by group or others), or None."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by its group or by others (mode {stat.filemode(info.st_mode)}; chmod go-w it)"
    return None


def check_trusted(path: Path) -> None:
    reason = untrusted_reason(path)
    if reason is not None:
        raise PermissionError(
            f"refusing the compile cache: {reason}. torch reads its entries with pickle, so the folder must be "
            f"trusted like code (FastPathConfig.compile_cache_dir / ${COMPILE_CACHE_ENV})"
        )


@dataclass
class CacheLoad:
    """What `CompileCache.load` read: files, and artifacts per kind ("inductor", "aot_autograd", ...)."""

    files: list[Path] = field(default_factory=list)
    artifacts: dict[str, int] = field(default_factory=dict)


def shape_set_key(shapes: Sequence[Mapping[str, Any]]) -> str:
    """A short stable hash of a warmed shape set (JSON values, order kept)."""
    text = json.dumps(list(shapes), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CompileCache:
    """The artifacts folder of one torch version under `root` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = compile_cache_root(root)
        self.folder = versioned_folder(self.root)
        self._written: Path | None = None  # this object's last file: replaced when its shape set grows

    def _open_folder(self, create: bool) -> bool:
        """Whether the folder exists (made 0700 when `create`); raises if it is not trusted."""
        if create:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.folder.is_dir():
            return False
        check_trusted(self.folder)
        return True

    def load(self) -> CacheLoad:
        """Load every artifact file of the folder that this process has not loaded yet."""
        result = CacheLoad()
        with _lock:
            if not self._open_folder(create=False):
                return result
            for path in sorted(self.folder.glob(f"*{ARTIFACTS_SUFFIX}")):
                path = path.resolve()
                if path in _loaded:
                    continue
                check_trusted(path)
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
                _loaded.add(path)
                result.files.append(path)
                for kind, keys in ({} if info is None else info.artifacts).items():
                    result.artifacts[kind] = result.artifacts.get(kind, 0) + len(keys)
        return result

    def save(self, shapes: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write what this process compiled so far (loaded entries it used included) under the key of
        `shapes`; None when torch recorded nothing (e.g. a backend without caches, such as aot_eager)."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        data, info = saved
        with _lock:
            self._open_folder(create=True)
            path = self.folder / f"{shape_set_key(shapes)}{ARTIFACTS_SUFFIX}"
            atomic_write_bytes(path, data)
            os.chmod(path, 0o600)
            description = {
                "torch": torch.__version__,
                "shapes": list(shapes),
                "artifacts": {kind: len(keys) for kind, keys in info.artifacts.items()},
            }
            atomic_write_json(path.with_suffix(".json"), description)
            _loaded.add(path.resolve())  # its entries are this process's own
            if self._written is not None and self._written != path:
                # A superset replaces the smaller set this object wrote (files of other processes stay).
                self._written.unlink(missing_ok=True)
                self._written.with_suffix(".json").unlink(missing_ok=True)
            self._written = path
        return path


__all__ = [
    "COMPILE_CACHE_ENV",
    "CacheLoad",
    "CompileCache",
    "check_trusted",
    "compile_cache_root",
    "shape_set_key",
    "untrusted_reason",
]
