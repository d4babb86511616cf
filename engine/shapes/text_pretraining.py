"""Pretraining ShapesEval's tiny T5 and CLIP on the caption language (`selfe data shapes --text-encoders pretrained`).

The paper's text encoders are pretrained; random ones map a caption to nearly a bag of words (swapping the
colours of a position prompt moves a T5 token's state by ~5%), so colour binding and object order hardly
reach the MMDiT. This trains both snapshots with a caption-scene objective before the MMDiT trains: linear
heads read, from every T5 token state, which object of the caption the token describes (first, second,
none) and that object's shape, colour and count, and the caption's relation; from the pooled CLIP vector,
both objects' shape, colour and count in caption order and the relation. A linear head can only read
what the states hold, so binding and order must be in them. The heads are dropped; the weights are written
back into the same snapshot files (safetensors, atomically), which the MMDiT then reads frozen, as now.

`separation` measures the effect: for caption pairs that differ only by swapping the two objects' colours
or (position prompts) the two objects' order, the relative distance of the states of the same words,
`||h(a) - h(b)|| / ||h(a)||` averaged over the matched tokens (T5), and of the pooled vector (CLIP); for
scale, the same for a one-word change (the first object recoloured).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from selfe.components.text_encoders import quiet_transformers
from selfe.method.objective import DEFAULT_FAKE_PROMPT_PREFIX
from selfe.shapes.scene import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    Prompt,
    Want,
    all_prompts,
    make_prompt,
)
from selfe.utils.atomic import atomic_write_bytes

# Class indices of the targets. Colour and count have a "not said" class (index 0): "a circle", "two squares".
COLOUR_CLASSES = (None, *COLOURS)
COUNT_CLASSES = (None, *COUNT_WORDS)
RELATION_CLASSES = (None, *RELATIONS)
NO_OBJECT = 2  # token slot class of words outside both objects ("and", the relation, the prefix, </s>)
IGNORE = -100  # cross_entropy's ignore_index: no target for this token / object


@dataclass
class TextPretraining:
    """Settings of the caption-scene pretraining; the defaults take under a minute on one CPU core (44 s
    measured on a shared, busy machine), and every state probe then reads its targets without error."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3  # AdamW, cosine decay to lr / 10
    weight_decay: float = 0.0
    fake_prefix_fraction: float = 0.5  # share of captions with the fake prompt's prefix, as the MMDiT sees them
    seed: int = 0
    # CPU threads while pretraining: for models this small one thread is fastest (measured: two threads on 2
    # busy cores ran 6x slower), and the result does not depend on how the sums were split
    num_threads: int = 1
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_threads", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextPretraining.{name} must be a positive int, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TextPretraining.lr must be finite and > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TextPretraining.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.fake_prefix_fraction <= 1:
            raise ValueError(f"TextPretraining.fake_prefix_fraction must be in [0, 1], got {self.fake_prefix_fraction}")


# ----------------------------------------------------------------------------------------------
# Targets


def word_slots(prompt: Prompt) -> list[int]:
    """For each word of the caption: the index of the object (want) it describes, or NO_OBJECT."""
    words = prompt.caption.split()
    if len(prompt.wants) == 1:
        return [0] * len(words)
    first, last = (2 + (want.colour is not None) for want in prompt.wants)  # "a [colour] shape"
    return [0] * first + [NO_OBJECT] * (len(words) - first - last) + [1] * last


def object_targets(prompt: Prompt, slot: int) -> tuple[int, int, int]:
    """(shape, colour, count) class indices of want `slot`; IGNORE for an object the caption lacks."""
    if slot >= len(prompt.wants):
        return IGNORE, IGNORE, IGNORE
    want = prompt.wants[slot]
    return SHAPES.index(want.shape), COLOUR_CLASSES.index(want.colour), COUNT_CLASSES.index(want.count)


def t5_targets(prompts: Sequence[Prompt], prefixed: Sequence[bool], word_ids: list[list[int | None]]) -> Tensor:
    """(B, L, 5) long: each token's slot, its object's shape, colour and count, and the caption's relation.
    word_ids: the tokenizer's word index per token (None for </s> and padding; padding is found by the mask)."""
    out = torch.full((len(prompts), len(word_ids[0]), 5), IGNORE, dtype=torch.long)
    for b, (prompt, prefix, ids) in enumerate(zip(prompts, prefixed, word_ids)):
        slots = word_slots(prompt)
        offset = len(DEFAULT_FAKE_PROMPT_PREFIX.split()) if prefix else 0
        relation = RELATION_CLASSES.index(prompt.relation)
        for t, word in enumerate(ids):
            slot = NO_OBJECT if word is None or word < offset else slots[word - offset]
            shape, colour, count = object_targets(prompt, slot) if slot != NO_OBJECT else (IGNORE,) * 3
            out[b, t] = torch.tensor([slot, shape, colour, count, relation])
    return out


def clip_targets(prompts: Sequence[Prompt]) -> Tensor:
    """(B, 7) long: the first and second object's shape, colour and count, and the relation."""
    rows = [[*object_targets(p, 0), *object_targets(p, 1), RELATION_CLASSES.index(p.relation)] for p in prompts]
    return torch.tensor(rows, dtype=torch.long)


T5_HEADS = (3, len(SHAPES), len(COLOUR_CLASSES), len(COUNT_CLASSES), len(RELATION_CLASSES))
CLIP_HEADS = (len(SHAPES), len(COLOUR_CLASSES), len(COUNT_CLASSES)) * 2 + (len(RELATION_CLASSES),)


class LinearHeads(nn.Module):
    """One linear classifier per target, read from the same features."""

    def __init__(self, width: int, classes: Sequence[int]):
        super().__init__()
        self.classes = tuple(classes)
        self.linear = nn.Linear(width, sum(self.classes))

    def loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """Sum over the heads of the mean cross-entropy; features (..., width), targets (..., heads)."""
        logits = self.linear(features).split(self.classes, dim=-1)
        return sum(
            nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[..., i].reshape(-1), ignore_index=IGNORE)
            for i, lg in enumerate(logits)
        )

    def accuracy(self, features: Tensor, targets: Tensor) -> float:
        """Share of the (token or caption, head) targets predicted right."""
        logits = self.linear(features).split(self.classes, dim=-1)
        hits = total = 0
        for i, lg in enumerate(logits):
            keep = targets[..., i] != IGNORE
            hits += int((lg.argmax(-1) == targets[..., i])[keep].sum())
            total += int(keep.sum())
        return hits / max(total, 1)


# ----------------------------------------------------------------------------------------------
# The encoders as they train


class ShapesTextPair:
    """The T5 and CLIP snapshots of a ShapesEval data folder, loaded trainable in float32 on the CPU."""

    @quiet_transformers()
    def __init__(self, t5_dir: str | Path, clip_dir: str | Path):
        from transformers import CLIPTextModel, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

        self.t5_dir, self.clip_dir = Path(t5_dir), Path(clip_dir)
        self.t5 = T5EncoderModel.from_pretrained(self.t5_dir, torch_dtype=torch.float32)
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(self.t5_dir)
        self.clip = CLIPTextModel.from_pretrained(self.clip_dir, torch_dtype=torch.float32)
        self.clip_tokenizer = CLIPTokenizerFast.from_pretrained(self.clip_dir)

    def t5_states(self, captions: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, list[list[int | None]]]:
        """Token states (B, L, d), token ids (B, L), mask (B, L) bool and each token's word index."""
        tokens = self.t5_tokenizer(list(captions), padding="longest", return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        states = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        return states, ids, mask.bool(), [tokens.word_ids(b) for b in range(len(captions))]

    def clip_pooled(self, captions: Sequence[str]) -> Tensor:
        """The pooled CLIP vector (B, d), as `CLIPTextEncoder` reads it (causal: padding does not matter)."""
        tokens = self.clip_tokenizer(list(captions), padding="longest", return_tensors="pt")
        return self.clip(input_ids=tokens["input_ids"]).pooler_output

    def save(self) -> None:
        """Write the weights back into the snapshots' model.safetensors, under the keys the files hold."""
        from safetensors import safe_open
        from safetensors.torch import save

        for model, folder in ((self.t5, self.t5_dir), (self.clip, self.clip_dir)):
            path = folder / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                keys, metadata = list(f.keys()), f.metadata()
            state = model.state_dict()
            tensors = {key: state[key].detach().clone().contiguous() for key in keys}
            atomic_write_bytes(path, save(tensors, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# Separation of swapped captions


def caption_pairs() -> dict[str, list[tuple[str, str]]]:
    """Caption pairs with the same words: "colours" swaps the two objects' colours (position and colour
    binding prompts); "order" swaps the two objects of a position prompt (the relation then reverses).
    And a reference, "recolour": the first object's colour replaced by a third one, a one-word change of
    the scene, which moves the other words' states even in a bag of words only through attention."""
    pairs: dict[str, list[tuple[str, str]]] = {"colours": [], "order": [], "recolour": []}
    for category in ("position", "color_attr"):
        for p in all_prompts(category):
            a, b = p.wants
            if a.colour == b.colour:
                continue
            swapped = make_prompt(category, (Want(a.shape, b.colour), Want(b.shape, a.colour)), p.relation)
            pairs["colours"].append((p.caption, swapped.caption))
            third = next(c for c in COLOURS if c not in (a.colour, b.colour))
            pairs["recolour"].append((p.caption, make_prompt(category, (Want(a.shape, third), b), p.relation).caption))
            if category == "position":
                pairs["order"].append((p.caption, make_prompt(category, (b, a), p.relation).caption))
    return pairs


def _matched_tokens(ids_a: list[int], ids_b: list[int]) -> list[tuple[int, int]]:
    """(position in a, position in b) of the same token, its k-th occurrence in a with its k-th in b."""
    where_b: dict[tuple[int, int], int] = {}
    seen: dict[int, int] = {}
    for j, token in enumerate(ids_b):
        where_b[(token, seen.get(token, 0))] = j
        seen[token] = seen.get(token, 0) + 1
    out, seen = [], {}
    for i, token in enumerate(ids_a):
        key = (token, seen.get(token, 0))
        seen[token] = key[1] + 1
        if key in where_b:
            out.append((i, where_b[key]))
    return out


@torch.no_grad()
def separation(pair: ShapesTextPair, batch: int = 256) -> dict[str, dict[str, float]]:
    """Per kind of `caption_pairs`: the mean relative distance of the T5 states of the same words
    (t5_tokens) and of the pooled CLIP vectors (clip_pooled) between a caption and its pair's. Near 0 for
    the swaps: a bag of words."""
    out = {}
    for kind, pairs in caption_pairs().items():
        token_dist, pooled_dist = [], []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            captions = [a for a, _ in chunk] + [b for _, b in chunk]
            states, ids, mask, _ = pair.t5_states(captions)
            pooled = pair.clip_pooled(captions)
            n = len(chunk)
            for k in range(n):
                ids_a = ids[k][mask[k]].tolist()
                ids_b = ids[n + k][mask[n + k]].tolist()
                for i, j in _matched_tokens(ids_a, ids_b):
                    ha, hb = states[k, i], states[n + k, j]
                    token_dist.append(float((ha - hb).norm() / ha.norm()))
            pooled_dist += ((pooled[:n] - pooled[n:]).norm(dim=-1) / pooled[:n].norm(dim=-1)).tolist()
        out[kind] = {"t5_tokens": float(np.mean(token_dist)), "clip_pooled": float(np.mean(pooled_dist))}
    return out


def separation_table(report: dict) -> str:
    """The report's separation, random init against pretrained, as lines of text."""
    before, after = report["separation"]["random"], report["separation"]["pretrained"]
    lines = [
        "separation of swapped captions (relative distance; recolour: a one-word change): random init -> pretrained"
    ]
    for kind in before:
        for encoder in before[kind]:
            lines.append(f"  {kind:8s} {encoder:12s} {before[kind][encoder]:.3f} -> {after[kind][encoder]:.3f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training


_ALL = {category: all_prompts(category) for category in CATEGORIES}


def _batch(rng: np.random.Generator, config: TextPretraining) -> tuple[list[Prompt], list[bool], list[str]]:
    """Prompts drawn uniformly per category (so binding and position prompts are a third of them)."""
    prompts, prefixed = [], []
    for _ in range(config.batch_size):
        pool = _ALL[CATEGORIES[int(rng.integers(len(CATEGORIES)))]]
        prompts.append(pool[int(rng.integers(len(pool)))])
        prefixed.append(bool(rng.random() < config.fake_prefix_fraction))
    captions = [DEFAULT_FAKE_PROMPT_PREFIX + p.caption if f else p.caption for p, f in zip(prompts, prefixed)]
    return prompts, prefixed, captions


def _losses(pair: ShapesTextPair, heads: nn.ModuleDict, prompts, prefixed, captions) -> tuple[Tensor, Tensor]:
    states, _, mask, word_ids = pair.t5_states(captions)
    targets = t5_targets(prompts, prefixed, word_ids)
    targets[~mask] = IGNORE
    return heads["t5"].loss(states, targets), heads["clip"].loss(pair.clip_pooled(captions), clip_targets(prompts))


@torch.no_grad()
def probe_accuracy(pair: ShapesTextPair, heads: nn.ModuleDict) -> dict[str, float]:
    """The heads' accuracy over every prompt of every category (the closed caption language), unprefixed."""
    prompts = [p for category in CATEGORIES for p in _ALL[category]]
    captions = [p.caption for p in prompts]
    states, _, mask, word_ids = pair.t5_states(captions)
    targets = t5_targets(prompts, [False] * len(prompts), word_ids)
    targets[~mask] = IGNORE
    return {
        "t5_tokens": heads["t5"].accuracy(states, targets),
        "clip_pooled": heads["clip"].accuracy(pair.clip_pooled(captions), clip_targets(prompts)),
    }


def pretrain(pair: ShapesTextPair, config: TextPretraining | None = None, progress: bool = True) -> dict:
    """Train `pair` in place on the caption-scene objective; returns the report (losses, probe accuracy,
    separation before and after, seconds). The pair's weights are not saved here (`ShapesTextPair.save`)."""
    config = TextPretraining() if config is None else config
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _pretrain(pair, config, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(pair: ShapesTextPair, config: TextPretraining, progress: bool) -> dict:
    before = separation(pair)
    with torch.random.fork_rng(devices=[]):  # seeded heads that leave the caller's global RNG alone
        torch.manual_seed(config.seed)
        t5_heads = LinearHeads(pair.t5.config.d_model, T5_HEADS)
        heads = nn.ModuleDict({"t5": t5_heads, "clip": LinearHeads(pair.clip.config.hidden_size, CLIP_HEADS)})
    params = [*pair.t5.parameters(), *pair.clip.parameters(), *heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    pair.t5.train()
    pair.clip.train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    log: list[dict] = []
    start = time.perf_counter()
    for step in range(config.steps):
        lr = config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / config.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        t5_loss, clip_loss = _losses(pair, heads, *_batch(rng, config))
        loss = t5_loss + clip_loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"text pretraining loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            rate = (step + 1) / (time.perf_counter() - start)
            eta = (config.steps - step - 1) / rate
            log.append({"step": step + 1, "t5": t5_loss.item(), "clip": clip_loss.item(), "lr": lr})
            if progress:
                print(
                    f"text pretraining {step + 1}/{config.steps}  t5 {t5_loss.item():.4f}  "
                    f"clip {clip_loss.item():.4f}  {rate:.2f} it/s  ETA {eta / 60:.1f} min",
                    file=sys.stderr,
                    flush=True,
                )
    seconds = time.perf_counter() - start
    for model in (pair.t5, pair.clip):
        model.eval().requires_grad_(False)
    return {
        "training": asdict(config),
        "losses": log,
        "probe_accuracy": probe_accuracy(pair, heads),
        "separation": {"random": before, "pretrained": separation(pair)},
        "seconds": seconds,
    }


def pretrain_snapshots(
    t5_dir: str | Path, clip_dir: str | Path, config: TextPretraining | None = None, progress: bool = True
) -> dict:
    """Pretrain the two snapshots and write their weights back (the heads are dropped); returns the report."""
    pair = ShapesTextPair(t5_dir, clip_dir)
    report = pretrain(pair, config, progress)
    pair.save()
    return report
