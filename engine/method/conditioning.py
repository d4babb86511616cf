"""Text conditioning for the Self-E objective: captions -> the model's {"txt", "txt_mask", "pooled"}.

Per training batch (docs/method.md §3) the objective needs three conditions of B rows each:
    cond: the captions after caption dropout (a dropped caption is the empty string)
    null: phi, the encoding of "" (not zeros), for the live unconditional self-evaluation pass
    fake: c_fake = fake_prompt_prefix + caption, for the auxiliary fake-score term (late training only)
All three share one token length, so they mix per sample with torch.where.

The encoder is anything with `encode(prompts) -> dict` (selfe.components.text_encoders.PromptEncoder): the real
T5 + CLIP `TextEncoders`, or a small fake in tests and in the 2-D toy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from selfe.components.text_encoders import NullConditionCache, PromptEncoder, TextEncoders, check_prompts
from selfe.method.objective import DEFAULT_FAKE_PROMPT_PREFIX, check_fake_prompt_prefix


@dataclass
class ConditioningConfig:
    """How captions become conditions. Choices the paper leaves open are marked [ours]."""

    caption_dropout: float = 0.1  # [ours] p_drop: probability a caption is replaced by ""
    fake_prompt_prefix: str = DEFAULT_FAKE_PROMPT_PREFIX  # the trainer takes objective.fake_prompt_prefix
    t5_max_length: int = 512
    clip_max_length: int = 77
    pad_to_max_length: bool = True  # static shapes; False pads to the longest prompt of the batch
    t5_attention_mask: bool = True  # [ours] mask padding inside T5 (FLUX passes none)

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        check_fake_prompt_prefix(self.fake_prompt_prefix)
        if self.t5_max_length < 1:
            raise ValueError(f"t5_max_length must be >= 1, got {self.t5_max_length}")
        if self.clip_max_length < 2:
            raise ValueError(f"clip_max_length must be >= 2 (start and end tokens), got {self.clip_max_length}")
        for name in ("pad_to_max_length", "t5_attention_mask"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


class TextConditioner:
    """Captions in, model conditions out; caption dropout and the fake prompt for the Self-E objective."""

    def __init__(self, encoder: PromptEncoder, config: ConditioningConfig | None = None):
        self.config = config or ConditioningConfig()
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"encoder must have encode(prompts) -> dict, got {type(encoder).__name__}")
        if isinstance(encoder, TextEncoders):
            _check_matches(encoder, self.config)
        self.encoder = encoder
        # An encoder that knows how to encode "" at any length exactly (TextEncoders) does so itself;
        # any other encoder gets a generic cache that pads its one encoding of "".
        null = getattr(encoder, "null_condition", None)
        self._null: Callable[[int, int | None], dict[str, Tensor]] = (
            null if callable(null) else NullConditionCache(encoder)
        )

    @classmethod
    def from_snapshots(
        cls,
        t5_path: str | Path,
        clip_path: str | Path,
        config: ConditioningConfig | None = None,
        *,
        t5_tokenizer_path: str | Path | None = None,
        clip_tokenizer_path: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> TextConditioner:
        """T5 + CLIP from local snapshot folders, set up from `config`."""
        config = config or ConditioningConfig()
        encoders = TextEncoders.from_snapshots(
            t5_path,
            clip_path,
            t5_tokenizer_path=t5_tokenizer_path,
            clip_tokenizer_path=clip_tokenizer_path,
            t5_max_length=config.t5_max_length,
            clip_max_length=config.clip_max_length,
            pad_to_max_length=config.pad_to_max_length,
            t5_attention_mask=config.t5_attention_mask,
            device=device,
            dtype=dtype,
        )
        return cls(encoders, config)

    def encode(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """The conditions for `captions` as given (no dropout): {"txt", "txt_mask", "pooled"}."""
        return self.encoder.encode(check_prompts(captions))

    def null_condition(self, batch: int, length: int | None = None) -> dict[str, Tensor]:
        """phi, the encoding of "", for `batch` rows at `length` tokens (cached; views, do not write)."""
        return self._null(batch, length)

    def fake_prompts(self, captions: Sequence[str]) -> list[str]:
        """c_fake per caption: prefix + caption; a dropped caption ("") gives the bare prefix."""
        return [self.config.fake_prompt_prefix + caption for caption in check_prompts(captions)]

    def drop_captions(self, captions: Sequence[str], generator: torch.Generator | None) -> tuple[list[str], Tensor]:
        """Captions with each replaced by "" with probability caption_dropout, and the (B,) bool mask
        of the dropped ones. One uniform per caption is drawn whatever the probability, so the
        generator advances the same way for every setting."""
        captions = check_prompts(captions)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        device = generator.device if generator is not None else torch.device("cpu")
        dropped = torch.rand(len(captions), generator=generator, device=device) < self.config.caption_dropout
        kept = [("" if drop else caption) for caption, drop in zip(captions, dropped.tolist())]
        return kept, dropped.cpu()

    def training_batch(
        self, captions: Sequence[str], generator: torch.Generator | None, want_fake: bool
    ) -> dict[str, dict[str, Tensor] | Tensor | None]:
        """The conditions one Self-E training step needs.

        Returns {"cond": ..., "null": ..., "fake": ... or None, "dropped": (B,) bool}, each condition a
        dict {"txt": (B, Lt, d_t5), "txt_mask": (B, Lt) bool, "pooled": (B, d_clip)} with one Lt.
        Dropout is deterministic under `generator`. The rows of `cond` whose caption was dropped are
        the null condition. For a dropped caption c_fake is the bare prefix ("fake image, "): the fake
        score models the samples the network drew under that sample's condition, which was phi, so
        its prompt marks "fake" and carries no caption either.
        """
        captions, dropped = self.drop_captions(captions, generator)
        batch = len(captions)
        prompts = captions + (self.fake_prompts(captions) if want_fake else [])
        # One encoder call for captions and fake prompts: one forward, and one padded length for both.
        encoded = self.encoder.encode(prompts)
        cond = {key: value[:batch] for key, value in encoded.items()}
        fake = {key: value[batch:] for key, value in encoded.items()} if want_fake else None
        null = self.null_condition(batch, cond["txt"].shape[1])
        return {"cond": cond, "null": null, "fake": fake, "dropped": dropped.to(cond["txt"].device)}


def _check_matches(encoders: TextEncoders, config: ConditioningConfig) -> None:
    """The loaded encoders pad and truncate the way the config says, or an error naming the field."""
    loaded = {
        "t5_max_length": encoders.t5.max_length,
        "clip_max_length": encoders.clip.max_length,
        "pad_to_max_length": encoders.pad_to_max_length,
        "t5_attention_mask": encoders.t5.attention_mask,
    }
    for name, value in loaded.items():
        if getattr(config, name) != value:
            raise ValueError(f"ConditioningConfig.{name}={getattr(config, name)!r} but the encoders use {value!r}")
