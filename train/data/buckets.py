"""Aspect-ratio buckets and the progressive resolution schedule.

A bucket is a (height, width) of about base^2 pixels with both sides multiples of `multiple` (16 =
VAE factor 8 x patch 2, so every bucket patchifies exactly). Buckets are indexed by aspect class: the
i-th aspect ratio of `BucketConfig.aspect_ratios`, the same list at every base resolution, so a
sample's class is fixed at scan time and the resolution can be drawn per batch.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# width / height, 1:4 .. 4:1; denser near square where most photos are.
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (
    1 / 4,
    1 / 3,
    1 / 2,
    2 / 3,
    3 / 4,
    1.0,
    4 / 3,
    3 / 2,
    2.0,
    3.0,
    4.0,
)


class Bucket(NamedTuple):
    """A target image size in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class BucketConfig:
    """aspect_ratios: width / height of each aspect class, ascending; multiple: both bucket sides are
    multiples of it (16 = autoencoder factor 8 x latent patch 2)."""

    aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
    multiple: int = 16

    def __post_init__(self) -> None:
        ratios = tuple(float(r) for r in self.aspect_ratios)
        object.__setattr__(self, "aspect_ratios", ratios)
        if not ratios:
            raise ValueError("BucketConfig.aspect_ratios is empty")
        if any(not math.isfinite(r) or r <= 0 for r in ratios):
            raise ValueError(f"BucketConfig.aspect_ratios must be positive finite numbers, got {ratios}")
        if list(ratios) != sorted(set(ratios)):
            raise ValueError(f"BucketConfig.aspect_ratios must be strictly ascending, got {ratios}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"BucketConfig.multiple must be a positive int, got {self.multiple!r}")

    def buckets(self, base: int) -> list[Bucket]:
        """One bucket per aspect class at base resolution `base` (about base^2 pixels)."""
        if isinstance(base, bool) or not isinstance(base, int) or base < self.multiple or base % self.multiple:
            raise ValueError(f"base resolution must be a positive multiple of {self.multiple}, got {base!r}")
        return [bucket_for_aspect(base, r, self.multiple) for r in self.aspect_ratios]

    def aspect_class(self, width: int, height: int) -> int:
        """Index of the aspect ratio nearest to width / height (in log space, so 1:2 and 2:1 are
        equally far from 1:1). Unknown size (0) -> the class nearest to square."""
        if width <= 0 or height <= 0:
            width = height = 1
        return nearest_index(self.aspect_ratios, width / height)


def bucket_for_aspect(base: int, aspect: float, multiple: int = 16) -> Bucket:
    """The (height, width) with width / height ~ aspect and height * width ~ base^2, sides rounded to
    `multiple` (at least one multiple)."""
    height = base / math.sqrt(aspect)
    width = base * math.sqrt(aspect)
    round_to = lambda x: max(multiple, int(round(x / multiple)) * multiple)
    return Bucket(round_to(height), round_to(width))


def nearest_index(ratios: Sequence[float], aspect: float) -> int:
    """Index of the ratio nearest to `aspect` in log space; `ratios` ascending. Ties go to the lower."""
    log_aspect = math.log(aspect)
    i = bisect.bisect_left(ratios, aspect)
    candidates = [j for j in (i - 1, i) if 0 <= j < len(ratios)]
    return min(candidates, key=lambda j: (abs(math.log(ratios[j]) - log_aspect), j))


@dataclass(frozen=True)
class ResolutionSchedule:
    """Progressive resolution: stages of (first iteration, {base resolution: weight}).

    `ResolutionSchedule(stages=((0, {256: 1.0}), (500_000, {256: 0.5, 512: 0.5})))` trains at 256^2,
    then from iteration 500k draws each batch's base resolution 256 or 512 with probability 1/2. The
    draw is a pure function of (seed, iteration), so it is the same on every rank and after a resume.
    """

    stages: tuple[tuple[int, Mapping[int, float]], ...] = ((0, {256: 1.0}),)

    def __post_init__(self) -> None:
        stages = tuple((int(start), {int(r): float(w) for r, w in mix.items()}) for start, mix in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("ResolutionSchedule needs at least one stage")
        starts = [s for s, _ in stages]
        if starts[0] != 0:
            raise ValueError(f"the first stage must start at iteration 0, got {starts[0]}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"stage starts must be strictly increasing, got {starts}")
        for start, mix in stages:
            if not mix:
                raise ValueError(f"stage at iteration {start} has no resolution")
            for res, weight in mix.items():
                if res < 16 or res % 16:
                    raise ValueError(f"stage at iteration {start}: resolution {res} is not a positive multiple of 16")
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"stage at iteration {start}: weight {weight} for {res} must be >= 0")
            if sum(mix.values()) <= 0:
                raise ValueError(f"stage at iteration {start}: weights sum to 0")

    @classmethod
    def fixed(cls, resolution: int) -> ResolutionSchedule:
        return cls(stages=((0, {resolution: 1.0}),))

    @classmethod
    def progressive(
        cls, switch_at: int = 500_000, low: int = 256, high: int = 512, high_fraction: float = 0.5
    ) -> ResolutionSchedule:
        """The paper's schedule (docs/method.md): `low` only until iteration `switch_at`, then each batch at
        `high` with probability high_fraction, else `low` (paper: 256, 512, 1:1 from 500k)."""
        if low >= high:
            raise ValueError(f"progressive schedule: low={low} must be below high={high}")
        if not 0.0 < high_fraction <= 1.0:
            raise ValueError(f"progressive schedule: high_fraction must be in (0, 1], got {high_fraction}")
        if switch_at < 1:
            raise ValueError(f"progressive schedule: switch_at must be >= 1, got {switch_at}")
        mix = {low: 1.0 - high_fraction, high: high_fraction}
        return cls(stages=((0, {low: 1.0}), (switch_at, mix)))

    @property
    def resolutions(self) -> list[int]:
        """Every base resolution any stage can draw, ascending."""
        return sorted({r for _, mix in self.stages for r, w in mix.items() if w > 0})

    def mix_at(self, iteration: int) -> dict[int, float]:
        """{resolution: probability} in force at `iteration` (normalised)."""
        starts = [s for s, _ in self.stages]
        mix = self.stages[bisect.bisect_right(starts, iteration) - 1][1]
        total = sum(mix.values())
        return {r: w / total for r, w in sorted(mix.items()) if w > 0}

    def resolution_at(self, iteration: int, seed: int = 0) -> int:
        """The base resolution of the batch at `iteration`, drawn with an RNG keyed on (seed, iteration)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        mix = self.mix_at(iteration)
        if len(mix) == 1:
            return next(iter(mix))
        u = random.Random(f"selfe-resolution/{seed}/{iteration}").random()
        acc = 0.0
        for res, p in mix.items():
            acc += p
            if u < acc:
                return res
        return res  # u within float error of 1
