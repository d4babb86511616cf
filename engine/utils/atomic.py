"""Writing files so that nothing is left half-written: a temp file in the same folder, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# mkstemp makes 0600 files; the result should have the mode a plain open() gives (0666 less the umask),
# so a results file or config is readable by the user's group as usual. Read once: umask() sets it too.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path`; a reader (or a restart after a kill) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int = 1) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=indent) + "\n").encode())


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be made (`mkdir -p`) and written into, or None. Commands check their output
    folder with this before long work, so a bad path fails in a second rather than after the run."""
    folder = Path(folder)
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:  # the folder `mkdir -p` would write into
        nearest = nearest.parent
    if not nearest.is_dir():
        return f"{nearest} is a file, not a folder"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"{nearest} is not writable"
    return None
