"""A bounded least-recently-used cache of prompt encodings, one entry per prompt.

Serving sees the same prompts again (a fixed negative prompt, a popular prompt, a retry); T5-XXL costs more
than a 2-step image at small sizes, so an encoding kept is time saved. `PromptEncodingCache.encode` runs the
encoder on the prompts it has not seen (one batch, duplicates once), keeps each prompt's row at its own
length, and answers the batch by padding every row to the batch's length:

    txt (1, L_i, d), txt_mask (1, L_i) bool, pooled (1, d_clip) per prompt  ->  (B, L, ...) for the batch

L_i is the prompt's own text bucket (or its token count, or the fixed length asked for), and L is the
largest L_i: what the encoder gives the batch as a whole. Padding a row with zero states and a False mask
is exact only for an encoder whose real-token states do not depend on the padding (T5 given its attention
mask, `TextEncoders` checks that); rows encoded in a batch of other prompts may differ from the same
prompt encoded alone in the last bits, as any batched matmul does.

Keys are (prompt, length rule, dtype, device), so a pipeline moved to another device or dtype never gets
a stale encoding. The answer is a fresh tensor (torch.cat copies), so a caller writing into it cannot
corrupt the cache. One lock guards the table; the encoder runs outside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Encoding = dict[str, Tensor]  # {"txt": (B, L, d), "txt_mask": (B, L) bool, "pooled": (B, d_clip)}


class PromptEncodingCache:
    """At most `capacity` prompt encodings, the least recently used evicted first. capacity 0: nothing is
    kept (every call encodes). `hits` / `misses` count prompts answered from the cache / encoded."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"the prompt cache's capacity must be an integer >= 0, got {capacity!r}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[tuple, Encoding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every encoding (the counts stay)."""
        with self._lock:
            self._rows.clear()

    def encode(
        self,
        prompts: Sequence[str],
        encode: Callable[[list[str]], Encoding],
        *,
        setting: tuple,
        row_length: Callable[[int], int],
    ) -> Encoding:
        """The batch's encoding, from the cache where it holds the prompt, else from `encode(missing)`.

        setting: what else the encoding depends on (the length rule, dtype, device), part of every key.
        row_length: a prompt's own length from its token count (at most what `encode` pads a batch to)."""
        keys = [(prompt, *setting) for prompt in prompts]
        with self._lock:
            found = {key: self._rows[key] for key in keys if key in self._rows}
            for key in found:
                self._rows.move_to_end(key)
            missing = list(dict.fromkeys(key[0] for key in keys if key not in found))
            self.hits += sum(key in found for key in keys)
            self.misses += len(missing)
        if missing:
            fresh = dict(zip(((prompt, *setting) for prompt in missing), _rows(encode(missing), row_length)))
            found.update(fresh)
            with self._lock:
                for key, row in fresh.items():
                    self._keep(key, row)
        rows = [found[key] for key in keys]
        length = max(row["txt"].shape[1] for row in rows)
        return {
            "txt": torch.cat([_pad(row["txt"], length) for row in rows]),
            "txt_mask": torch.cat([_pad(row["txt_mask"], length) for row in rows]),
            "pooled": torch.cat([row["pooled"] for row in rows]),
        }

    def _keep(self, key: tuple, row: Encoding) -> None:
        if self.capacity == 0:
            return
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)


def _rows(batch: Encoding, row_length: Callable[[int], int]) -> list[Encoding]:
    """Each prompt's row of a batch encoding, cut to its own length and copied out of the batch (a view
    would keep the whole batch alive). One host sync for the token counts, on a miss only."""
    tokens = batch["txt_mask"].sum(dim=1).tolist()
    rows = []
    for i, count in enumerate(tokens):
        length = row_length(int(count))
        rows.append(
            {
                "txt": batch["txt"][i : i + 1, :length].clone(),
                "txt_mask": batch["txt_mask"][i : i + 1, :length].clone(),
                "pooled": batch["pooled"][i : i + 1].clone(),
            }
        )
    return rows


def _pad(value: Tensor, length: int) -> Tensor:
    """value (1, L, ...) padded with zeros (False for a mask) to `length` along the token axis."""
    extra = length - value.shape[1]
    if extra == 0:
        return value
    return torch.cat([value, value.new_zeros(value.shape[0], extra, *value.shape[2:])], dim=1)


__all__ = ["PromptEncodingCache"]
