"""Batch sources for the trainer: each yields, per optimizer step, this rank's `grad_accum` micro-batches
already in the objective's form:
    {"x0": (b, 16, h, w) latents, "cond" / "null_cond" / "fake_cond" / "fake_null_cond": {"txt",
     "txt_mask", "pooled"} (the fake ones None until the auxiliary term is on), "num_tokens": image tokens
     per sample}
and a `state_dict()` that resumes the order exactly.

procedural: learnable data made in memory from short captions (colour x shape) encoded by the smoke text
    encoder; the micro-batch of (step, slot = micro * world + rank) is a pure function of the seed, so
    1 rank with grad_accum 2 sees exactly the samples of 2 ranks with grad_accum 1.
synthetic: one random batch of the right shapes, reused (benchmarks; nothing to learn).
cache: a `selfe cache` folder through CachedDataset (its own resumable bucketed order).
images: a manifest's images through ImageTextLoader, encoded on the fly (or its cache when present).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from selfe.components.text_encoders import fit_to_text_bucket
from selfe.method.objective import DEFAULT_FAKE_PROMPT_PREFIX
from selfe.network.config import MMDiTConfig
from selfe.train.config import DataSection

# What a cache stores (CachedDataset.widths) -> the model key that must equal it
CACHE_WIDTH_KEYS = {"latent_channels": "in_channels", "txt_dim": "txt_dim", "pooled_dim": "vec_dim"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "bar", "ring")


def fake_prompts(prefix: str, captions: list[str]) -> list[str]:
    """c_fake of each caption, then of the empty caption (the bare prefix, for the dropped ones)."""
    return [prefix + c for c in captions] + [prefix]


def split_fake(encoded: dict[str, torch.Tensor], b: int) -> tuple[dict, dict]:
    """fake_prompts' encodings -> (fake_cond (b rows), fake_null_cond (the last row, expanded to b))."""
    return {k: v[:b] for k, v in encoded.items()}, {k: v[b:].expand(b, *v.shape[1:]) for k, v in encoded.items()}


def _shape_masks(h: int, w: int) -> torch.Tensor:
    """(len(SHAPES), h, w) simple shapes centred in the latent grid."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    r = (yy.square() + xx.square()).sqrt()
    masks = [r < 0.6, (yy.abs() < 0.5) & (xx.abs() < 0.5), yy.abs() < 0.2, (r > 0.4) & (r < 0.7)]
    return torch.stack(masks).float()


class ProceduralSource:
    """`num_samples` captions "a COLOUR SHAPE"; latents = colour code (16,) x shape mask, rolled by a
    per-sample offset, plus a background code. Deterministic under data.seed."""

    def __init__(
        self, data: DataSection, model: MMDiTConfig, rank: int, world_size: int, grad_accum: int, fake_prefix: str
    ):
        from selfe.train.smoke_encoders import SmokeTextEncoder  # SMOKE ONLY: random-init text encoder

        self.batch_size, self.rank, self.world_size, self.accum = data.batch_size, rank, world_size, grad_accum
        self.seed = data.seed
        n, h = data.num_samples, data.resolution // 8
        self.num_samples = n
        g = torch.Generator().manual_seed(data.seed)
        colours = torch.randint(len(COLOURS), (n,), generator=g)
        shapes = torch.randint(len(SHAPES), (n,), generator=g)
        offsets = torch.randint(-h // 4, h // 4 + 1, (n, 2), generator=g)
        codes = torch.randn(len(COLOURS), model.in_channels, generator=g)
        background = 0.3 * torch.randn(model.in_channels, 1, 1, generator=g)
        masks = _shape_masks(h, h)
        latents = codes[colours][:, :, None, None] * masks[shapes][:, None] + background
        self.latents = torch.stack([torch.roll(x, tuple(o.tolist()), (1, 2)) for x, o in zip(latents, offsets)])
        self.captions = [f"a {COLOURS[c]} {SHAPES[s]}" for c, s in zip(colours.tolist(), shapes.tolist())]
        encoder = SmokeTextEncoder(model.txt_dim, model.vec_dim, data.text_length, seed=data.seed)
        self.text = encoder(self.captions)
        self.fake, self.fake_null = split_fake(encoder(fake_prompts(fake_prefix, self.captions)), n)
        self.null = encoder([""])
        self.num_tokens = (h // model.patch_size) ** 2
        self.global_batch = self.batch_size * world_size * grad_accum
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data.num_samples={n} is smaller than one global batch ({self.global_batch} = batch_size "
                f"{self.batch_size} x world {world_size} x grad_accum {grad_accum})"
            )
        self.epoch, self.position = 0, 0

    def _indices(self, slot: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.captions))
        start = self.position * self.global_batch + slot * self.batch_size
        return perm[start : start + self.batch_size]

    def next_step(self, want_fake: bool) -> list[dict[str, Any]]:
        out = []
        for micro in range(self.accum):
            idx = torch.as_tensor(self._indices(micro * self.world_size + self.rank))
            b = len(idx)
            out.append(
                {
                    "x0": self.latents[idx],
                    "cond": {k: v[idx] for k, v in self.text.items()},
                    "null_cond": {k: v.expand(b, *v.shape[1:]) for k, v in self.null.items()},
                    "fake_cond": {k: v[idx] for k, v in self.fake.items()} if want_fake else None,
                    "fake_null_cond": {k: v[idx] for k, v in self.fake_null.items()} if want_fake else None,
                    "num_tokens": self.num_tokens,
                }
            )
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"cannot resume the procedural data order: saved global batch {state['global_batch']}, now "
                f"{self.global_batch} (data.batch_size x world size x optim.grad_accum); resume with the same"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class SyntheticSource:
    """One fixed random batch of the right shapes (latents, full-length text states), reused every step."""

    def __init__(self, data: DataSection, model: MMDiTConfig, grad_accum: int, device: torch.device | None = None):
        g = torch.Generator().manual_seed(data.seed)
        b, h, lt = data.batch_size, data.resolution // 8, data.text_length
        cond = lambda: {  # noqa: E731
            "txt": torch.randn(b, lt, model.txt_dim, generator=g),
            "txt_mask": torch.ones(b, lt, dtype=torch.bool),
            "pooled": torch.randn(b, model.vec_dim, generator=g),
        }
        self.batch = {
            "x0": torch.randn(b, model.in_channels, h, h, generator=g),
            "cond": cond(),
            "null_cond": cond(),
            "fake_cond": cond(),
            "fake_null_cond": cond(),
            "num_tokens": (h // model.patch_size) ** 2,
        }
        if device is not None:  # made once on the device: a benchmark must not time host-to-device copies
            self.batch = {
                k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
                if k != "num_tokens"
                else v
                for k, v in self.batch.items()
            }
        self.accum, self.steps = grad_accum, 0

    def next_step(self, want_fake: bool) -> list[dict[str, Any]]:
        self.steps += 1
        fakes = {k: self.batch[k] if want_fake else None for k in ("fake_cond", "fake_null_cond")}
        return [{**self.batch, **fakes}] * self.accum

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class CacheSource:
    """Batches of a `selfe cache` folder. The cache holds no encoding of the fake prompt, so once the
    auxiliary term is on, prefix + caption is encoded online by `data.encoders` (T5 + CLIP from
    t5_path / clip_path), loaded then and not before."""

    def __init__(
        self,
        data: DataSection,
        model: MMDiTConfig,
        rank: int,
        world_size: int,
        grad_accum: int,
        fake_prefix: str,
        device: torch.device | None = None,
    ):
        from selfe.train.data.cached import CachedDataset

        self.dataset = CachedDataset(
            data.cache_dir,
            data.batch_size,
            seed=data.seed,
            rank=rank,
            world_size=world_size,
            schedule=data.resolution_schedule(),
            batches_per_step=grad_accum,
            verify=data.cache_verify,
        )
        if data.manifest:
            _check_cache_manifest(data, self.dataset.index)
        self._check_widths(data.cache_dir, model)
        self.accum, self.patch = grad_accum, model.patch_size
        self.data, self.model, self.device = data, model, device or torch.device("cpu")
        self.fake_prefix = fake_prefix
        self._fake_encoder = None

    @property
    def num_samples(self) -> int:
        return len(self.dataset.sample_indices)

    def _check_widths(self, cache_dir: str, model: MMDiTConfig) -> None:
        """A cache encoded for another model is refused now, not by a shape error in the first step."""
        widths = self.dataset.widths()
        wrong = [
            f"{name} {widths[name]} where model.{key}={getattr(model, key)}"
            for name, key in CACHE_WIDTH_KEYS.items()
            if widths[name] != getattr(model, key)
        ]
        if wrong:
            raise ValueError(
                f"data.cache_dir={cache_dir!r} was encoded for another model: it stores {', '.join(wrong)}; "
                "set those model keys to the cache's or use a cache of this model's encoders"
            )

    def _fake(self, captions: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self._fake_encoder is None:
            try:
                self._fake_encoder = _text_encoder(self.data, self.model, self.device)
            except ValueError as err:
                raise ValueError(
                    f"the auxiliary term is on, and a cache stores no encoding of the fake prompt: {err}"
                ) from err
        with torch.no_grad():
            return split_fake(self._fake_encoder(fake_prompts(self.fake_prefix, captions)), len(captions))

    def next_step(self, want_fake: bool) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.accum):
            batch = next(self.dataset)
            x0 = batch["latents"].float()
            cond = {k: batch[k] for k in ("txt", "txt_mask", "pooled")}
            fake, fake_null = self._fake(list(batch["captions"])) if want_fake else (None, None)
            null = self.dataset.null_condition(x0.shape[0])
            out.append(objective_batch(x0, cond, null, fake, fake_null, self.patch))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


class EncodingSource:
    """Images of a manifest decoded by ImageTextLoader and encoded on the fly (autoencoder + text
    encoders); the fake prompt is encoded in the same call as the captions (one padded length)."""

    def __init__(
        self,
        data: DataSection,
        model: MMDiTConfig,
        rank: int,
        world_size: int,
        grad_accum: int,
        fake_prefix: str,
        device: torch.device,
    ):
        from selfe.train.data import BucketConfig, ImageTextLoader, LoaderConfig, scan_manifest
        from selfe.train.data.manifest import ManifestConfig

        self.loader = ImageTextLoader(
            scan_manifest(data.manifest, data.base_dir, ManifestConfig(min_side=data.min_side)),
            BucketConfig(),
            data.resolution_schedule(),
            LoaderConfig(batch_size=data.batch_size, seed=data.seed, batches_per_step=grad_accum),
            rank,
            world_size,
        )
        self.accum, self.patch, self.device, self.fake_prefix = grad_accum, model.patch_size, device, fake_prefix
        self.encode_image = _image_encoder(data, model, device)
        self.encode_text = _text_encoder(data, model, device)
        self._null: dict[str, torch.Tensor] | None = None

    @property
    def num_samples(self) -> int:
        return self.loader.sampler.num_samples

    @torch.no_grad()
    def next_step(self, want_fake: bool) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.accum):
            batch = next(self.loader)
            x0 = self.encode_image(batch["images"].to(self.device)).float()
            captions = list(batch["captions"])
            b = len(captions)
            prompts = captions + (fake_prompts(self.fake_prefix, captions) if want_fake else [])
            encoded = self.encode_text(prompts)
            if self._null is None:
                self._null = self.encode_text([""])
            if self._null["txt"].shape[1] != encoded["txt"].shape[1]:
                raise ValueError("the text encoder must pad to a fixed length (the null prompt mixes per sample)")
            cond = {k: v[:b] for k, v in encoded.items()}
            null = {k: v.expand(b, *v.shape[1:]) for k, v in self._null.items()}
            fake, fake_null = split_fake({k: v[b:] for k, v in encoded.items()}, b) if want_fake else (None, None)
            out.append(objective_batch(x0, cond, null, fake, fake_null, self.patch))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


CONDITION_KEYS = ("cond", "null_cond", "fake_cond", "fake_null_cond")


def cut_batch_text(batch: dict[str, Any], bucket: int | None) -> dict[str, Any]:
    """The batch with its four conditions fitted to one text length, the bucket of the longest real text
    among them (`data.text_bucket`; `fit_to_text_bucket`): a fake prompt encoded at another length joins."""
    if bucket is None:
        return batch
    return {**batch, **dict(zip(CONDITION_KEYS, fit_to_text_bucket([batch.get(k) for k in CONDITION_KEYS], bucket)))}


def objective_batch(
    x0: torch.Tensor, cond: dict, null: dict, fake: dict | None, fake_null: dict | None, patch: int
) -> dict[str, Any]:
    """The batch SelfELoss takes: latents x0 (B, C, H, W), the four conditions and the image tokens per sample."""
    return {
        "x0": x0,
        "cond": cond,
        "null_cond": null,
        "fake_cond": fake,
        "fake_null_cond": fake_null,
        "num_tokens": (x0.shape[2] // patch) * (x0.shape[3] // patch),
    }


def _image_encoder(data: DataSection, model: MMDiTConfig, device: torch.device):
    """images (B, 3, H, W) in [-1, 1] -> normalised latents: the smoke stand-in, or the FLUX.1 autoencoder."""
    if data.encoders == "smoke":
        from selfe.train.smoke_encoders import SmokeImageEncoder

        return SmokeImageEncoder(model.in_channels, seed=data.seed)
    if data.encoders == "pixels":
        return pixel_autoencoder(data).to(device).encode
    if not data.ae_path:
        raise ValueError("data.encoders='flux' needs data.ae_path (or data.encoders=smoke for a pipeline check)")
    from selfe.components.autoencoder import load_autoencoder

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_autoencoder(data.ae_path, device=device, dtype=dtype).encode


def _text_encoder(data: DataSection, model: MMDiTConfig, device: torch.device):
    """prompts -> {"txt", "txt_mask", "pooled"} on `device`: the smoke stand-in sized to the model, or T5 + CLIP."""
    if data.encoders == "smoke":
        from selfe.train.smoke_encoders import SmokeTextEncoder

        text = SmokeTextEncoder(model.txt_dim, model.vec_dim, data.text_length, seed=data.seed)
        return lambda prompts: {k: v.to(device) for k, v in text(prompts).items()}
    missing = [k for k in ("t5_path", "clip_path") if not getattr(data, k)]
    if missing:
        raise ValueError(
            f"data.encoders={data.encoders!r} needs {missing} (or data.encoders=smoke for a pipeline check)"
        )
    from selfe.components.text_encoders import TextEncoders

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoders = TextEncoders.from_snapshots(
        data.t5_path, data.clip_path, t5_max_length=data.t5_max_length, device=device, dtype=dtype
    )
    return encoders.encode


def pixel_autoencoder(data: DataSection):
    """The space-to-depth autoencoder of data.encoders="pixels" (see selfe.components.pixel_autoencoder)."""
    from selfe.components.pixel_autoencoder import SpaceToDepthAutoEncoder, SpaceToDepthConfig

    return SpaceToDepthAutoEncoder(
        SpaceToDepthConfig(downsample_factor=data.pixel_factor, scale_factor=data.pixel_scale)
    )


def build_source(
    data: DataSection,
    model: MMDiTConfig,
    rank: int,
    world_size: int,
    grad_accum: int,
    device: torch.device | None = None,
    fake_prefix: str = DEFAULT_FAKE_PROMPT_PREFIX,
):
    """The source data.source names; fake_prefix: the objective's fake_prompt_prefix."""
    if data.source == "procedural":
        return ProceduralSource(data, model, rank, world_size, grad_accum, fake_prefix)
    if data.source == "synthetic":
        return SyntheticSource(data, model, grad_accum, device)
    if data.source == "images" and not _holds_cache(data.cache_dir):
        return EncodingSource(data, model, rank, world_size, grad_accum, fake_prefix, device or torch.device("cpu"))
    return CacheSource(data, model, rank, world_size, grad_accum, fake_prefix, device)


def _check_cache_manifest(data: DataSection, index: dict[str, Any]) -> None:
    """A cache (its `index`) read in place of data.manifest's images must be that manifest's (its hash), in
    EncodingSource's buckets: a cache of another data set would train silently."""
    from selfe.train.data import BucketConfig
    from selfe.train.data.loader import cache_mismatch

    if (problem := cache_mismatch(index, data.manifest, BucketConfig())) is not None:
        raise ValueError(
            f"data.cache_dir={data.cache_dir!r} is not the cache of data.manifest={data.manifest!r}: it {problem}; "
            "point data.cache_dir at that manifest's `selfe cache` folder"
        )


def _holds_cache(cache_dir: str | None) -> bool:
    from selfe.train.data.cached import INDEX_NAME

    return bool(cache_dir) and os.path.isfile(os.path.join(cache_dir, INDEX_NAME))
