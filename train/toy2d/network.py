"""A small dual-time MLP with the MMDiT's conditioning: vec = MLP_t(t) + MLP_s(t - s) + label embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """(B,) times -> (B, dim) sinusoids of `scale * t` (FLUX's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ModulatedBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with shift/scale/gate from the global vector."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(nn.functional.silu(vec)).chunk(3, dim=-1)
        return x + (1 + gate) * self.mlp(self.norm(x) * (1 + scale) + shift)


class DualTimeMLP(nn.Module):
    """V(x, t, s, label) for 2-D points. Labels: 0..K-1 conditions, K the null label, K+1+c the fake label of c,
    2K+1 the fake label of the null one (c_fake of a dropped caption).

    As in the MMDiT, the gap t - s enters only through the global vector, and the last layer of
    its MLP starts at zero so that at initialisation the network is a flow-matching network.
    """

    def __init__(self, num_conditions: int, width: int = 256, depth: int = 4, time_dim: int = 64):
        super().__init__()
        self.num_conditions, self.time_dim = num_conditions, time_dim
        self.t_embed = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.gap_embed = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.gap_embed[-1].weight)
        nn.init.zeros_(self.gap_embed[-1].bias)
        self.label_embed = nn.Embedding(2 * num_conditions + 2, width)
        self.inp = nn.Linear(2, width)
        self.blocks = nn.ModuleList(ModulatedBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, 2)

    @property
    def null_label(self) -> int:
        return self.num_conditions

    def fake_labels(self, labels: Tensor) -> Tensor:
        return labels + self.num_conditions + 1

    @property
    def fake_null_label(self) -> int:
        return 2 * self.num_conditions + 1

    def forward(self, x: Tensor, t: Tensor, s: Tensor, labels: Tensor) -> Tensor:
        """x: (B, 2); t, s: (B,); labels: (B,) int64. Returns V: (B, 2)."""
        vec = (
            self.t_embed(sinusoidal_embedding(t, self.time_dim))
            + self.gap_embed(sinusoidal_embedding(t - s, self.time_dim))
            + self.label_embed(labels)
        )
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, vec)
        return self.out(self.out_norm(h))
