"""SMOKE ONLY: tiny fixed random stand-ins for the autoencoder and the text encoders.

`selfe cache --smoke` and the tests use them to check the data pipeline without weights or
transformers. They are deterministic (seeded; words hashed with blake2b, stable across runs and
processes) but carry no meaning: never train on their output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


class SmokeImageEncoder:
    """A fixed random 8x8 stride-8 convolution: images (B, 3, H, W) -> latents (B, channels, H/8, W/8)."""

    def __init__(self, channels: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, 3, 8, 8, generator=generator) / (3 * 64) ** 0.5

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(images.float(), self.weight.to(images.device), stride=8)


class SmokeTextEncoder:
    """Words hashed into a fixed random embedding table.

    prompts (B strings) -> dict(txt (B, max_length, dim) zero at padding, txt_mask (B, max_length)
    bool, pooled (B, pooled_dim) = a fixed projection of the mean word embedding). "" has no token.
    """

    def __init__(self, dim: int = 64, pooled_dim: int = 32, max_length: int = 32, vocab: int = 4096, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, dim, generator=generator)
        self.proj = torch.randn(dim, pooled_dim, generator=generator) / dim**0.5
        self.max_length = max_length

    def _token(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(self.table)

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        b, length = len(prompts), self.max_length
        txt = torch.zeros(b, length, self.table.shape[1])
        mask = torch.zeros(b, length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens = [self._token(w) for w in prompt.lower().split()][:length]
            if tokens:
                txt[row, : len(tokens)] = self.table[tokens]
                mask[row, : len(tokens)] = True
        count = mask.sum(1, keepdim=True).clamp(min=1)
        return {"txt": txt, "txt_mask": mask, "pooled": (txt.sum(1) / count) @ self.proj}
