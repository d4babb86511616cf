"""2-D axial RoPE tables, FLUX style: each token has ids (0, row, col); text tokens all zero.

The head dim is split into `axes_dim` chunks, one per id axis; chunk i rotates its consecutive
pairs (2j, 2j+1) by `id_i * theta^(-2j / axes_dim[i])`. The tables are (L, Dh/2) cos and sin in
float32, the layout `selfe.kernels.reference.apply_rope` / `qk_norm_rope` take.
"""

from __future__ import annotations

import torch
from torch import Tensor


def image_position_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Ids of a (height x width) token grid in row-major order: (height * width, 3) = (0, row, col)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack((torch.zeros_like(rows), rows, cols), dim=-1)


def text_position_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """Text tokens all sit at position 0 (FLUX): (length, 3) zeros, i.e. no rotation."""
    return torch.zeros(length, 3, dtype=torch.long, device=device)


def rope_tables(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of every pair's angle. ids: (L, n_axes) -> two (L, sum(axes_dim) / 2) float32 tensors.

    Angles are computed in float64 (as FLUX does) where the device has it: positions times the
    lowest frequencies lose digits in float32 at large resolutions.
    """
    if ids.dim() != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"rope ids must be (L, {len(axes_dim)}), got {tuple(ids.shape)}")
    acc = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        exponent = torch.arange(0, dim, 2, dtype=acc, device=ids.device) / dim
        omega = 1.0 / (theta**exponent)
        angles.append(ids[:, axis].to(acc)[:, None] * omega[None, :])
    angle = torch.cat(angles, dim=-1)
    return torch.cos(angle).float(), torch.sin(angle).float()


def joint_rope_tables(
    txt_len: int,
    height: int,
    width: int,
    axes_dim: tuple[int, ...],
    theta: float,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Tables for the joint sequence [img; txt] of (height x width) image and `txt_len` text tokens: image
    first, so each row's text padding sits at its end (`selfe.network.attention`).

    Returns cos, sin: (height * width + txt_len, Dh / 2) float32.
    """
    ids = torch.cat((image_position_ids(height, width, device), text_position_ids(txt_len, device)), dim=0)
    return rope_tables(ids, axes_dim, theta)
