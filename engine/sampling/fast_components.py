"""The parts around the denoising step made fast: compiled text encoders, a compiled channels-last decoder,
kept prompt encodings, and torch.compile's artifacts kept across processes.

`FastComponents.prepare(device)` applies the FastPathConfig fields below on the device the pipeline runs
on (again after it moved), before anything there compiles:

- compile_text_encoder: T5 and CLIP as `CompiledPerShape`: one static-shape trace per (batch, tokens).
  The pipeline runs T5 at the prompts' text bucket, so a server sees a few such shapes.
- compile_decoder / decoder_channels_last: the FLUX decoder likewise, per latent shape; `tiled_decode`
  cuts equal tiles, so a large image adds one shape however many tiles it has.
- prompt_cache_size: the TextEncoders' LRU of recent prompts' encodings (0 leaves the encoders' own).
- compile_cache: the first prepare loads the saved artifacts (`selfe.sampling.compile_cache`);
  `save(shapes)` writes what the process compiled, `SelfEPipeline.warmup` calls it.

Every compiled part equals its eager self up to float rounding (tests/engine/test_fast_components.py).
Text encoders other than `TextEncoders`, and the weightless space-to-depth autoencoder, are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from selfe.components.autoencoder import AutoEncoder
from selfe.components.encoding_cache import PromptEncodingCache
from selfe.components.text_encoders import TextEncoders
from selfe.sampling.compile_cache import CacheLoad, CompileCache
from selfe.sampling.fast_path import FastPathConfig
from selfe.utils.compiling import CompiledPerShape


class FastComponents:
    """The text encoders and the autoencoder of one pipeline, set up as `config` says (module docstring)."""

    def __init__(self, config: FastPathConfig, text_encoders: Any, autoencoder: Any):
        self.config = config
        self.text_encoders = text_encoders if isinstance(text_encoders, TextEncoders) else None
        self.autoencoder = autoencoder if isinstance(autoencoder, AutoEncoder) else None
        if self.text_encoders is not None and config.prompt_cache_size > 0:  # 0 keeps the encoders' own setting
            self.text_encoders.prompt_cache = PromptEncodingCache(config.prompt_cache_size)
        self.compile_cache = CompileCache(config.compile_cache_dir)
        self.cache_load: CacheLoad | None = None  # what the first prepare with the cache on loaded
        self.warmed: list[dict[str, Any]] = []  # the shapes `SelfEPipeline.warmup` prepared, in order
        self._prepared_for: str | None = None  # the device type prepare last ran for

    # ------------------------------------------------------------------------------------------
    # What runs where ("auto" resolved per device)

    def _step_compiles(self, device: torch.device) -> bool:
        compile_step = self.config.compile
        return device.type == "cuda" if compile_step == "auto" else bool(compile_step)

    def _on(self, value: bool | str, device: torch.device) -> bool:
        """A compile switch: "auto" is on CUDA when the step compiles."""
        if value == "auto":
            return device.type == "cuda" and self._step_compiles(device)
        return bool(value)

    def compiles_text_encoder(self, device: torch.device) -> bool:
        return self._on(self.config.compile_text_encoder, device)

    def compiles_decoder(self, device: torch.device) -> bool:
        return self._on(self.config.compile_decoder, device)

    def uses_channels_last(self, device: torch.device) -> bool:
        """With "auto", as the decoder compiles: its generated kernels take the layout (eager GroupNorm may not)."""
        value = self.config.decoder_channels_last
        return self.compiles_decoder(device) if value == "auto" else bool(value)

    def uses_compile_cache(self, device: torch.device) -> bool:
        value = self.config.compile_cache
        if value == "auto":
            return self._on("auto", device) and self.config.compile_backend == "inductor"
        return bool(value)

    # ------------------------------------------------------------------------------------------

    def prepare(self, device: torch.device) -> None:
        """Set the components up for `device` (once per device type; cheap after that)."""
        if self._prepared_for == device.type:
            return
        if self.uses_compile_cache(device) and self.cache_load is None:
            self.cache_load = self.compile_cache.load()  # before anything compiles
        encoders, autoencoder = self.text_encoders, self.autoencoder
        if encoders is not None:
            on = self.compiles_text_encoder(device)
            encoders.t5.compiled_model = self._compiled(encoders.t5.model, "T5 encoder") if on else None
            encoders.clip.compiled_model = self._compiled(encoders.clip.model, "CLIP text encoder") if on else None
        if autoencoder is not None:
            autoencoder.set_decoder_channels_last(self.uses_channels_last(device))
            on = self.compiles_decoder(device)
            autoencoder.compiled_decoder = self._compiled(autoencoder.decoder, "decoder") if on else None
        self._prepared_for = device.type

    def _compiled(self, module: torch.nn.Module, name: str) -> CompiledPerShape:
        config = self.config
        return CompiledPerShape(
            module,
            name=name,
            backend=config.compile_backend,
            mode=config.compile_mode,
            max_shapes=config.max_compiled_shapes,
        )

    @property
    def decoder_compiled(self) -> bool:
        return self.autoencoder is not None and self.autoencoder.compiled_decoder is not None

    def warmed_up(self, shape: Mapping[str, Any], device: torch.device) -> Path | None:
        """Record a shape `SelfEPipeline.warmup` prepared and, with the compile cache on, save the artifacts
        of every shape prepared so far (one file per shape set). Returns the file written, if any."""
        shape = dict(shape, device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
        if shape not in self.warmed:
            self.warmed.append(shape)
        if not self.uses_compile_cache(device):
            return None
        return self.compile_cache.save(self.warmed)


__all__ = ["FastComponents"]
