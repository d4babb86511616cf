"""Import hygiene for a source checkout: the checkout's kernels/ folder must not hide an installed `kernels`.

In the repository, kernels/ is selfe.kernels and bench/kernels.py is the kernel benchmark. But Python run from
the checkout's root (`python -m pytest`, `python -c`) finds that folder under the bare name `kernels`, and a
bench script (`python bench/x.py`, which puts bench/ first on sys.path) finds bench/kernels.py, both ahead of
site-packages. Hugging Face's `kernels` package, which transformers imports at load time (a hard dependency
from transformers 5.x), then resolves to our file and transformers fails with "cannot import name ... from
'kernels'".

The finder below answers for the top-level name `kernels` alone, and searches sys.path without the checkout's
folders that hold a `kernels` of their own; where no installed `kernels` exists it defers to the normal search.
It is installed only when selfe is imported from a source checkout (engine/ next to kernels/), never from an
installed wheel.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

SHADOWED_NAME = "kernels"


def checkout_root() -> Path | None:
    """The repository root when selfe runs from a source checkout (this file in engine/utils/), else None."""
    engine_dir = Path(__file__).resolve().parent.parent
    root = engine_dir.parent
    if engine_dir.name == "engine" and (root / SHADOWED_NAME / "dispatch.py").is_file():
        return root
    return None


def shadowing_folders(root: Path) -> frozenset[Path]:
    """The checkout's folders that hold a `kernels` of their own: kernels/ in the root, bench/kernels.py."""
    return frozenset((root, root / "bench"))


def _resolves_into(entry: str, folders: frozenset[Path]) -> bool:
    try:
        return Path(entry or ".").resolve() in folders
    except OSError:  # an entry that cannot be resolved is none of ours
        return False


class InstalledKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level `kernels` on sys.path with the checkout's shadowing folders left out."""

    def __init__(self, root: Path):
        self.skipped = shadowing_folders(root)

    def find_spec(self, fullname, path=None, target=None):
        if fullname != SHADOWED_NAME or path is not None:
            return None
        search = [entry for entry in sys.path if not _resolves_into(entry, self.skipped)]
        return importlib.machinery.PathFinder.find_spec(fullname, search)


def install_kernels_finder() -> InstalledKernelsFinder | None:
    """Put the finder first on sys.meta_path (once) when running from a checkout; return it, or None."""
    root = checkout_root()
    if root is None:
        return None
    for finder in sys.meta_path:
        if isinstance(finder, InstalledKernelsFinder):
            return finder
    finder = InstalledKernelsFinder(root)
    sys.meta_path.insert(0, finder)
    return finder
