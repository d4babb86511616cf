"""Conditional 2-D data whose per-condition mean lies off the data.

Each of K conditions owns M modes on a ring, interleaved with the other conditions' modes, so the
conditional mean (what a one-step flow-matching model predicts from pure noise) sits at the centre,
far from every mode of its condition.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class RingMixture:
    """K conditions x M modes at radius `radius`; mode j of the ring belongs to condition j mod K."""

    num_conditions: int = 4
    modes_per_condition: int = 3
    radius: float = 2.0
    mode_std: float = 0.1

    def __post_init__(self) -> None:
        if self.num_conditions < 1 or self.modes_per_condition < 1:
            raise ValueError("the ring needs at least one condition and one mode per condition")
        if self.radius <= 0 or self.mode_std <= 0:
            raise ValueError(f"radius and mode_std must be positive, got {self.radius}, {self.mode_std}")

    @property
    def centers(self) -> Tensor:
        """(K*M, 2) mode centres, in ring order."""
        n = self.num_conditions * self.modes_per_condition
        angles = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
        return (self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()

    @property
    def owners(self) -> Tensor:
        """(K*M,) the condition that owns each mode."""
        n = self.num_conditions * self.modes_per_condition
        return torch.arange(n) % self.num_conditions

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n points: x (n, 2) float32 and labels y (n,) int64, conditions and modes uniform."""
        modes = torch.randint(len(self.owners), (n,), generator=generator)
        x = self.centers[modes] + self.mode_std * torch.randn(n, 2, generator=generator)
        return x, self.owners[modes]


def load_npz(path: str | Path) -> tuple[Tensor, Tensor]:
    """A user's data: arrays `x` (N, 2) float and `y` (N,) integer labels 0..K-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        arrays = np.load(path, allow_pickle=False)
    except ValueError as err:  # numpy's take on a file without the zip or .npy magic: pickled data
        raise ValueError(f"{path} is not an .npz archive") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # empty or truncated files
        raise ValueError(f"{path} is not a readable .npz archive ({err})") from err
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array (.npy); it needs an .npz with x (N, 2) and y (N,)")
    with arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path} lacks array(s) {sorted(missing)}; it needs x (N, 2) float and y (N,) int labels")
        try:
            x, y = arrays["x"], arrays["y"]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:  # object arrays, corrupt members
            raise ValueError(f"{path}: cannot read x and y ({err})") from err
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{path}: x must have shape (N, 2), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{path}: y must have shape ({x.shape[0]},) to match x, got {y.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{path}: x must hold real numbers, got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if x.shape[0] < 10:
        raise ValueError(f"{path}: too few points ({x.shape[0]}) to train and evaluate")
    # Labels 0..K-1 size the network's label embedding (2K + 1 rows): K above the point count means labels
    # with no points, and a huge K would allocate gigabytes (or overflow int64).
    if y.min() < 0 or y.max() >= x.shape[0]:
        raise ValueError(f"{path}: labels must lie in 0..N-1 (N = {x.shape[0]} points), got {y.min()}..{y.max()}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise ValueError(f"{path}: x holds non-finite values (or values beyond float32's range)")
    return torch.from_numpy(x32), torch.from_numpy(y.astype(np.int64))


def split_holdout(
    x: Tensor, y: Tensor, fraction: float, generator: torch.Generator
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Random (train, held-out) split of user data."""
    perm = torch.randperm(x.shape[0], generator=generator)
    n_hold = max(1, int(round(fraction * x.shape[0])))
    hold, train = perm[:n_hold], perm[n_hold:]
    return (x[train], y[train]), (x[hold], y[hold])
