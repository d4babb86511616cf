"""Batch operations on a network's condition, whatever its form.

A condition is a tensor with the batch first (the 2-D task's labels), a dict of such tensors (the
MMDiT's {"txt", "txt_mask", "pooled"}), or None for an entry a network does not need. The objective and
the sampler use only these helpers, so they never depend on what a condition holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Condition = Any  # Tensor | dict[str, Tensor | None] | None


def _map(fn, *conds: Condition) -> Condition:
    first = conds[0]
    if first is None:
        if any(c is not None for c in conds):
            raise ValueError("conditions disagree: one entry is None where another holds a tensor")
        return None
    if isinstance(first, Tensor):
        return fn(*conds)
    if isinstance(first, dict):
        keys = first.keys()
        for c in conds[1:]:
            if not isinstance(c, dict) or c.keys() != keys:
                other = sorted(c) if isinstance(c, dict) else type(c).__name__
                raise ValueError(f"conditions have different entries: {sorted(keys)} vs {other}")
        return {k: _map(fn, *(c[k] for c in conds)) for k in keys}
    raise TypeError(f"a condition must be a tensor, a dict of tensors or None, got {type(first).__name__}")


def select(cond: Condition, index: Tensor | slice) -> Condition:
    """The samples `index` (a slice or an index tensor) of every batched entry."""
    return _map(lambda c: c[index], cond)


def concat(*conds: Condition) -> Condition:
    """Concatenate conditions along the batch."""
    return _map(lambda *cs: torch.cat(cs, dim=0), *conds)


def where(mask: Tensor, if_true: Condition, if_false: Condition) -> Condition:
    """Per sample: `if_true` where mask (B,) is set, else `if_false`. Entries must have equal shapes."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ValueError(
                f"cannot mix conditions of shapes {tuple(a.shape)} and {tuple(b.shape)} per sample: "
                "encode the null prompt to the same padded length as the captions"
            )
        return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)

    return _map(pick, if_true, if_false)


def batch_size(cond: Condition) -> int | None:
    """The batch size of the first tensor found, or None."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.shape[0]
    for value in cond.values():
        size = batch_size(value)
        if size is not None:
            return size
    return None
