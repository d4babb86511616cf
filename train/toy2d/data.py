"""Conditional 2-D data whose per-condition mean lies off the data.

Each of K conditions owns M modes on a ring, interleaved with the other conditions' modes, so the
conditional mean (what a one-step flow-matching model predicts from pure noise) sits at the centre,
far from every mode of its condition.
"""

from __future__ import annotations

import math
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
        raise FileNotFoundError(f"--data {path}: no such file")
    with np.load(path, allow_pickle=False) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path} lacks array(s) {sorted(missing)}; it needs x (N, 2) float and y (N,) int labels")
        x, y = arrays["x"], arrays["y"]
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{path}: x must have shape (N, 2), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{path}: y must have shape ({x.shape[0]},) to match x, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0, got min {y.min()}")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x holds non-finite values")
    if x.shape[0] < 10:
        raise ValueError(f"{path}: too few points ({x.shape[0]}) to train and evaluate")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def split_holdout(
    x: Tensor, y: Tensor, fraction: float, generator: torch.Generator
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Random (train, held-out) split of user data."""
    perm = torch.randperm(x.shape[0], generator=generator)
    n_hold = max(1, int(round(fraction * x.shape[0])))
    hold, train = perm[:n_hold], perm[n_hold:]
    return (x[train], y[train]), (x[hold], y[hold])
