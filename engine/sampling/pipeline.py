"""The library API: `SelfEPipeline`, text to images at any step count, in the conventions diffusers users know.

    pipe = SelfEPipeline.from_pretrained("exports/selfe-2b", torch_dtype=torch.bfloat16, device="cuda")
    images = pipe("a photo of a cat", steps=2, guidance=5.0, seed=0).images   # list of PIL images

Pipeline directory layout (what `from_pretrained` reads; the trainer's export writes the first two):

    DIR/model.safetensors   the MMDiT state dict (names as `MMDiT.state_dict()`)
    DIR/config.json         {"model": MMDiTConfig.to_dict(),               required
                             "sampler": {SamplerConfig fields},           optional: the call defaults
                             "autoencoder": {...},                        optional: default FLUX.1, either
                                 {AutoEncoderConfig fields}               a FLUX-architecture VAE ("type":
                                                                          "flux1" may be given), or
                                 {"type": "space_to_depth",               the weightless pixel-space one
                                  SpaceToDepthConfig fields}              (selfe.components.pixel_autoencoder)
                             "resolution": int,                           optional: native image side in
                                                                          pixels, the call default (else 512)
                             "text": {"t5_max_length", "clip_max_length", "t5_attention_mask"}}  optional
                            A bare MMDiTConfig dict (no "model" key) is accepted too.
    DIR/ae.safetensors      the FLUX.1 autoencoder (or pass `autoencoder_path=`); not used (and not
                            needed) with a "space_to_depth" autoencoder, which has no weights
    DIR/text_encoder        T5 encoder snapshot (or pass `t5_path=`)
    DIR/text_encoder_2      CLIP text snapshot (or pass `clip_path=`)

The two text folders are told apart by their config.json `model_type`, so the FLUX / diffusers layout
(text_encoder = CLIP, text_encoder_2 = T5) loads as well; tokenizer files are read from the encoder's
folder, else from the sibling `tokenizer` / `tokenizer_2` folder. Everything is local: no hub access.

A call validates every argument before any device work (errors name the argument), encodes the prompts
once (the null prompt "" is cached by the text encoders), samples with the fast path of
`selfe.sampling.fast_path` (one compiled, CUDA-graph-captured step for every step count) or eagerly, and decodes.
What a call may ask for (images, image tokens, steps) is bounded by `pipe.limits` (selfe.sampling.request_limits),
checked with the arguments. A NaN or Inf output is a NonFiniteOutputWarning naming the step where the latents went
non-finite, and `output.nonfinite` says it (selfe.sampling.nonfinite); it costs one host sync after the loop.

Threads: a pipeline runs one call at a time. `__call__`, `warmup` and `to` hold the pipeline's lock (an RLock), so
calls from several threads are serialized and give exactly the images they give one by one: the compiled step,
its CUDA graphs' static buffers, the tokenizers and the text encoders' caches are shared. For throughput, batch
prompts into one call, or give each device its own pipeline.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfe.components.autoencoder import AutoEncoder, load_autoencoder
from selfe.components.fp8 import FP8Config, convert_for_inference, fp8_autocast_context
from selfe.components.pixel_autoencoder import SpaceToDepthAutoEncoder, SpaceToDepthConfig
from selfe.components.text_encoders import (
    DTYPE_NAMES,
    TextEncoders,
    fit_condition_length,
    fit_to_text_bucket,
    text_bucket_length,
)
from selfe.components.weights import check_safetensors_file, load_safetensors_into
from selfe.network.config import MMDiTConfig
from selfe.network.model import MMDiT
from selfe.sampling.fast_components import FastComponents
from selfe.sampling.fast_path import FastPathConfig, FastSampler
from selfe.sampling.nonfinite import NonFiniteOutputWarning, first_nonfinite_step, fork_generators, nonfinite_message
from selfe.sampling.pipeline_files import (
    CONFIG_FILE,
    MODEL_FILE,
    read_pipeline_config,
    required_file,
    text_encoder_dirs,
)
from selfe.sampling.pipeline_inputs import (
    autoencoder_source,
    check_choice,
    check_engine_options,
    check_int,
    check_prompt,
    check_text_snapshots,
    check_text_widths,
    checked_device,
    checked_dtype,
    checked_root,
    checked_text_options,
    plain_numbers,
    side_error,
    warn_truncated,
    warn_unknown_words,
)
from selfe.sampling.pipeline_repr import pipeline_repr
from selfe.sampling.progress import (
    CALLBACK_TENSOR_INPUTS,
    ProgressBarMixin,
    check_step_callback,
    counted_progress,
    step_end_hook,
)
from selfe.sampling.request_limits import RequestLimits, checked_limits, guidance_problem
from selfe.sampling.sampler import METHODS, S_POLICIES, SamplerConfig, draw_noise, sample
from selfe.sampling.stage_timings import StageTimings

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
MAX_SIZE = 4096  # pixels per side accepted by default; RoPE has no hard limit, memory has
DEFAULT_SIZE = 512  # pixels per side when neither the call nor the pipeline's config gives one
AUTOENCODERS = (AutoEncoder, SpaceToDepthAutoEncoder)


def _serialized(method: Callable) -> Callable:
    """The pipeline method, run holding the pipeline's lock (one call at a time: the module docstring)."""

    @functools.wraps(method)
    def locked(self: SelfEPipeline, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass
class SelfEPipelineOutput:
    """images: list of PIL images ("pil"), a (B, 3, H, W) tensor in [0, 1] ("pt"), a (B, H, W, 3) float
    array ("np"), or the (B, C, h, w) latents ("latent"). latents: the sampled latents, always.
    timings: seconds per stage (text_encoder, warmup, denoise, decode) and end_to_end, from the prompts'
    encoding to the decoded images (argument checks and the PIL / numpy conversion left out); on CUDA timed
    with events, so reading a time waits for that stage's work (`selfe.sampling.stage_timings`).
    nonfinite: None, or why the latents or images hold NaN / Inf (the NonFiniteOutputWarning's text)."""

    images: Any
    latents: Tensor
    timings: Mapping[str, float] = field(default_factory=dict)
    nonfinite: str | None = None


class SelfEPipeline(ProgressBarMixin):
    """Text encoders + dual-time MMDiT + autoencoder, sampled at any step count.

    Each call shows a tqdm bar over its steps (`set_progress_bar_config(disable=True)` turns it off)."""

    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)  # diffusers' name for what callbacks may get

    def __init__(
        self,
        model: MMDiT,
        autoencoder: AutoEncoder | SpaceToDepthAutoEncoder,
        text_encoders: Any,
        *,
        sampler_defaults: SamplerConfig | None = None,
        fast_path: FastPathConfig | None = None,
        max_size: int = MAX_SIZE,
        fp8: str | FP8Config = "none",
        default_resolution: int | None = None,
        limits: RequestLimits | None = None,
    ):
        """autoencoder: the FLUX-architecture AutoEncoder (latent models) or the weightless
        SpaceToDepthAutoEncoder (pixel-space models).
        text_encoders: a TextEncoders or anything with encode(prompts) and null_condition(batch, length).
        fast_path: None runs the compiled / graphed step with default settings; pass
        FastPathConfig(compile=False, cuda_graph="off") for a plain eager step.
        fp8: "none", "torchao", "te" or an FP8Config: the model's large linears are converted in place for
        FP8 sampling here, after its weights are loaded and before the step is ever compiled.
        default_resolution: the image side used when a call omits height / width (None: 512).
        limits: what one call may ask for (None: RequestLimits(), the defaults); settable later as `pipe.limits`."""
        if not isinstance(model, MMDiT):
            raise TypeError(f"model must be an MMDiT, got {type(model).__name__}")
        if not isinstance(autoencoder, AUTOENCODERS):
            raise TypeError(
                f"autoencoder must be an AutoEncoder or a SpaceToDepthAutoEncoder, got {type(autoencoder).__name__}"
            )
        for method in ("encode", "null_condition"):
            if not callable(getattr(text_encoders, method, None)):
                raise TypeError(f"text_encoders must have {method}(), got {type(text_encoders).__name__}")
        if autoencoder.config.z_channels != model.config.in_channels:
            raise ValueError(
                f"the autoencoder has {autoencoder.config.z_channels} latent channels, the model expects "
                f"in_channels={model.config.in_channels}"
            )
        check_text_widths(text_encoders, model.config)
        if sampler_defaults is not None and not isinstance(sampler_defaults, SamplerConfig):
            raise TypeError(f"sampler_defaults must be a SamplerConfig or None, got {type(sampler_defaults).__name__}")
        check_engine_options(fast_path, max_size)
        self.limits = RequestLimits() if limits is None else limits
        if default_resolution is not None:
            error = side_error(
                "default_resolution",
                default_resolution,
                autoencoder.downsample_factor,
                model.config.patch_size,
                max_size,
            )
            if error:
                raise ValueError(f"default_resolution={default_resolution!r} is not a valid size: {error}")
        self.fp8 = resolve_fp8(fp8)
        self.model = convert_for_inference(model.eval().requires_grad_(False), self.fp8)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.text_encoders = text_encoders
        self.sampler_defaults = sampler_defaults if sampler_defaults is not None else SamplerConfig()
        self.fast = FastSampler(self.model, fast_path)
        # Compiled text encoders and decoder, kept encodings, the on-disk compile cache (FastPathConfig).
        self.components = FastComponents(self.fast.config, text_encoders, self.autoencoder)
        self.max_size = max_size
        self.default_resolution = default_resolution
        self._lock = threading.RLock()  # one call at a time (module docstring)

    @classmethod
    def from_components(
        cls,
        model: MMDiT,
        autoencoder: AutoEncoder | SpaceToDepthAutoEncoder,
        text_encoders: Any,
        **kwargs: Any,
    ) -> SelfEPipeline:
        """A pipeline around modules already in memory (e.g. the trainer's EMA model).

        With `fp8=` other than "none" the model is converted in place (pass a copy to keep the original)."""
        return cls(model, autoencoder, text_encoders, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        autoencoder_path: str | Path | None = None,
        t5_path: str | Path | None = None,
        clip_path: str | Path | None = None,
        text_encoder_dtype: torch.dtype | str | None = None,
        fast_path: FastPathConfig | None = None,
        max_size: int = MAX_SIZE,
        fp8: str | FP8Config = "none",
        limits: RequestLimits | None = None,
    ) -> SelfEPipeline:
        """Load a pipeline directory (layout in the module docstring) from local files only.

        torch_dtype: of the MMDiT and the autoencoder (default bf16 on CUDA, fp32 on CPU);
        text_encoder_dtype: of T5 and CLIP (default: torch_dtype).
        autoencoder_path: the FLUX autoencoder's weights (default DIR/ae.safetensors); an error with a
        "space_to_depth" autoencoder, which has none.
        fp8: "none", "torchao", "te" or an FP8Config (see `__init__`); the file stays high precision.
        limits: a RequestLimits (see `__init__`).
        The config's "resolution" becomes `default_resolution`.
        device: "cpu", "cuda", "cuda:1", a torch.device or None (CUDA when present, else CPU); one that
        does not parse or is not available here is a ValueError naming `device`.
        Everything is checked before any weights load: the arguments, config.json (types and values of
        every entry, the model / autoencoder channel match), and that every file and folder is there.
        """
        # Every argument, config.json entry and file is checked before any weight is read (errors name
        # the argument, key or file); then the model, the autoencoder and the text encoders load.
        root = checked_root(path)
        device = checked_device(device)
        dtype = checked_dtype("torch_dtype", torch_dtype, device)
        text_dtype = (
            dtype if text_encoder_dtype is None else checked_dtype("text_encoder_dtype", text_encoder_dtype, device)
        )
        check_engine_options(fast_path, max_size)
        if limits is not None:
            checked_limits(limits)
        fp8 = resolve_fp8(fp8)
        for name, value in (("autoencoder_path", autoencoder_path), ("t5_path", t5_path), ("clip_path", clip_path)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}")
        meta = read_pipeline_config(root)
        where = str(root / CONFIG_FILE)
        text = checked_text_options(meta["text"], where)
        model_config: MMDiTConfig = meta["model"]
        model_file = required_file(root / MODEL_FILE, "model weights")
        ae_config, ae_file = autoencoder_source(root, meta["autoencoder"], autoencoder_path)
        if ae_config.z_channels != model_config.in_channels:
            raise ValueError(
                f"{where}: the autoencoder has {ae_config.z_channels} latent channels, the model expects "
                f"in_channels={model_config.in_channels}"
            )
        if meta["resolution"] is not None:
            error = side_error(
                "resolution", meta["resolution"], ae_config.downsample_factor, model_config.patch_size, max_size
            )
            if error:
                raise ValueError(f"{where}: 'resolution' is not a valid default size (max_size={max_size}): {error}")
        with torch.device("meta"):  # shapes only: the weight files' headers are checked against them
            model = MMDiT(model_config)
            meta_autoencoder = None if ae_file is None else AutoEncoder(ae_config)
        check_safetensors_file(model, model_file)
        if meta_autoencoder is not None:
            check_safetensors_file(meta_autoencoder, ae_file)
        t5_dir, t5_tok, clip_dir, clip_tok = text_encoder_dirs(root, t5_path, clip_path)
        check_text_snapshots(t5_dir, t5_tok, clip_dir, clip_tok, model_config, text.get("clip_max_length", 77))

        load_safetensors_into(model, model_file, device=device, dtype=dtype)
        if isinstance(ae_config, SpaceToDepthConfig):
            autoencoder = SpaceToDepthAutoEncoder(ae_config).to(device).eval()
        else:
            autoencoder = load_autoencoder(ae_file, ae_config, device=device, dtype=dtype)
        text_encoders = TextEncoders.from_snapshots(
            t5_dir,
            clip_dir,
            t5_tokenizer_path=t5_tok,
            clip_tokenizer_path=clip_tok,
            device=device,
            dtype=text_dtype,
            **text,
        )
        return cls(
            model,
            autoencoder,
            text_encoders,
            sampler_defaults=meta["sampler"],
            fast_path=fast_path,
            max_size=max_size,
            fp8=fp8,
            default_resolution=meta["resolution"],
            limits=limits,
        )

    # ------------------------------------------------------------------------------------------
    # Properties

    @property
    def device(self) -> torch.device:
        return self.model.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.img_in.weight.dtype

    def __repr__(self) -> str:
        return pipeline_repr(self)

    @property
    def limits(self) -> RequestLimits:
        """What one call may ask for (a RequestLimits; RequestLimits.none() lifts every limit)."""
        return self._limits

    @limits.setter
    def limits(self, value: RequestLimits) -> None:
        self._limits = checked_limits(value)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: autoencoder downsampling x patch size (16 for FLUX)."""
        return self.autoencoder.downsample_factor * self.model.config.patch_size

    @_serialized
    def to(self, *args: Any, device: Any = None, dtype: Any = None) -> SelfEPipeline:
        """Move the pipeline to a device and / or cast the model and the autoencoder to a dtype, as in
        diffusers: `pipe.to("cuda")`, `pipe.to(torch.bfloat16)`, `pipe.to("cuda", torch.bfloat16)`.

        The text encoders move with it and keep their dtype (text_encoder_dtype). Steps compiled or
        captured for the old device or dtype are not reused. Returns the pipeline."""
        for arg in args:  # positional, in either order: a dtype (or its name, "bf16") or a device
            if isinstance(arg, torch.dtype) or (isinstance(arg, str) and arg in DTYPE_NAMES):
                if dtype is not None:
                    raise TypeError(f"dtype given twice: {args}, dtype={dtype!r}")
                dtype = arg
            else:
                if device is not None:
                    raise TypeError(f"device given twice: {args}, device={device!r}")
                device = arg
        device = None if device is None else checked_device(device)
        dtype = None if dtype is None else checked_dtype("dtype", dtype, device or self.device)
        if dtype is not None and dtype != self.dtype and self.fp8.recipe != "none":
            raise ValueError(
                f"the model was converted for FP8 ({self.fp8.recipe}) in {self.dtype}; load it with "
                f"torch_dtype={dtype} instead of casting it"
            )
        self.model.to(device=device, dtype=dtype)
        self.autoencoder.to(device=device, dtype=dtype)
        if device is not None and callable(getattr(self.text_encoders, "to", None)):
            self.text_encoders.to(device)
        self.fast.forget_captures()
        return self

    # ------------------------------------------------------------------------------------------
    # Stages

    def encode_prompts(
        self, prompts: list[str], guided: bool, negative: list[str] | None = None, text_tokens: int | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """cond {"txt": (B, Lt, d), "txt_mask": (B, Lt), "pooled": (B, d_clip)} and the null condition
        (the cached encoding of "", same Lt) or None without guidance. negative: B prompts that take the
        null condition's place (encoded in the same call as the prompts, so at the same length). Lt is the
        text bucket (FastPathConfig.text_bucket) of the longest prompt, or of `text_tokens` when given."""
        bucket = self.fast.config.text_bucket
        length = self._text_length(bucket, text_tokens)  # T5 runs on the bucket, when that is exact
        if negative is not None and length:
            # Apart, so the negatives' encodings are kept (TextEncoders.encode_negative); both at the longer's
            # length, exact as T5 here takes its mask.
            cond = self.text_encoders.encode(prompts, **length)
            null = self.text_encoders.encode_negative(negative, **length)
            common = max(cond["txt"].shape[1], null["txt"].shape[1])
            cond, null = fit_condition_length(cond, common), fit_condition_length(null, common)
        elif negative is not None:
            both = self.text_encoders.encode(prompts + negative, **length)
            cond = {k: v[: len(prompts)] for k, v in both.items()}
            null = {k: v[len(prompts) :] for k, v in both.items()}
        else:
            cond = self.text_encoders.encode(prompts, **length)
            null = self.text_encoders.null_condition(len(prompts), cond["txt"].shape[1]) if guided else None
        if not length:  # other encoders, and T5 without its mask, ran at their full length: cut their states
            cond, null = fit_to_text_bucket([cond, null], bucket, text_tokens)
        to_model = lambda c: {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in c.items()}
        return to_model(cond), (None if null is None else to_model(null))

    def _text_length(self, bucket: int | None, text_tokens: int | None) -> dict[str, int]:
        """How TextEncoders should pad: to the bucket of the prompts (T5 runs on fewer tokens), or of
        `text_tokens` (warm-up). {} without a bucket, for other encoders, and for a T5 without its attention
        mask (its real states depend on the padding: it runs at full length, `fit_to_text_bucket` cuts after)."""
        encoders = self.text_encoders
        if bucket is None or not isinstance(encoders, TextEncoders) or not encoders.t5.attention_mask:
            return {}
        if text_tokens is None:
            return {"bucket": bucket}
        limit = encoders.t5.max_length
        if text_tokens > limit:
            raise ValueError(f"text_tokens must be at most the text encoder's padded length {limit}, got {text_tokens}")
        return {"length": text_bucket_length(text_tokens, bucket, limit)}

    @_serialized
    def warmup(
        self,
        batch: int,
        height: int | None = None,
        width: int | None = None,
        guidance: bool | None = None,
        sampler: str | None = None,
        text_tokens: int | None = None,
    ) -> float:
        """Compile (and on CUDA capture) the step for `batch` images of height x width; returns seconds.

        batch counts images, not prompts x images. height / width None: `default_size`. guidance (warm
        the guided step or not) and sampler None: as a call with the pipeline's defaults would run.
        text_tokens: warm the text bucket of prompts up to this many T5 tokens (EOS included; default: the
        smallest bucket, FastPathConfig.text_bucket, which short prompts use). The first call of a new
        shape does this by itself.

        Prepared: the step for (batch, latent height x width, that text bucket, guided or not, sampler);
        where they are compiled (FastPathConfig.compile_text_encoder / compile_decoder), T5 and CLIP at
        (batch, bucket) and the null prompt's (1, bucket), and the decoder at (batch, latent shape). With
        FastPathConfig.compile_cache on, the artifacts of every shape warmed so far are saved for the next
        process (`selfe.sampling.compile_cache`). Call it once per (resolution, batch, text bucket) to serve;
        another shape mid-serving compiles once, the rest stay compiled.
        """
        batch, height, width = plain_numbers(batch, height, width)
        check_int("batch", batch, 1)
        height, width = self._resolve_size(height, width)
        self._check_size(height, width)
        self.limits.check_images(batch, f"batch={batch}")
        self.limits.check_tokens(batch, height, width, self.size_multiple)
        sampler = self.sampler_defaults.method if sampler is None else sampler
        check_choice("sampler", sampler, METHODS)
        if guidance is None:
            guidance = runs_cfg(self.sampler_defaults.guidance)
        if not isinstance(guidance, bool):
            raise TypeError(f"guidance must be a bool (warm up the guided step or not) or None, got {guidance!r}")
        if text_tokens is not None:
            (text_tokens,) = plain_numbers(text_tokens)
            check_int("text_tokens", text_tokens, 1)
        start = time.perf_counter()
        self.components.prepare(self.device)
        cond, null = self.encode_prompts([""] * batch, guided=guidance, text_tokens=text_tokens)
        x = torch.zeros(batch, *self._latent_shape(height, width), device=self.device)
        with fp8_autocast_context(self.fp8):
            self.fast.warmup(x, cond, null, sampler, self.sampler_defaults.kernel_backend)
        if self.components.decoder_compiled:
            with torch.no_grad():  # as in a call: grad mode is part of what the trace guards on
                self.decode(x)
        text_length = cond["txt"].shape[1]
        shape = dict(batch=batch, height=height, width=width, text_length=text_length, guided=guidance, sampler=sampler)
        self.components.warmed_up(dict(shape, dtype=str(self.dtype)), self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [0, 1].

        The FLUX autoencoder casts the latents to its own dtype; a weightless one (space-to-depth) has
        no dtype of its own and decodes in float32, so bf16 sampling does not round the pixels twice."""
        if next(self.autoencoder.parameters(), None) is None:
            latents = latents.float()
        images = self.autoencoder.decode(latents)
        return ((images.float() + 1) / 2).clamp(0, 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) a call uses when it omits them: `default_resolution` squared, else 512 x 512."""
        side = self.default_resolution if self.default_resolution is not None else DEFAULT_SIZE
        return side, side

    # ------------------------------------------------------------------------------------------
    # The call

    @_serialized
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        steps: int | None = None,
        guidance: float | None = ...,  # type: ignore[assignment]
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sampler: str | None = None,
        s_policy: str | None = None,
        s_fixed: float | None = None,
        eta: float | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        fast: bool = True,
        progress: Callable[[int], None] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = ...,  # type: ignore[assignment]
        negative_prompt: str | Sequence[str] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> SelfEPipelineOutput:
        """Generate images for one prompt or a list.

        steps (alias num_inference_steps): any count >= 1, default from the pipeline's config (2).
        guidance (alias guidance_scale): omega >= 0 of energy-preserving CFG; None: no CFG; default the
            pipeline's config (the training run's export_guidance; the shipped ShapesEval model has none).
            Omega 1 equals no CFG exactly, so it runs as None (one forward per step).
        height / width: pixels, multiples of `size_multiple`; None: `default_size` (the config's resolution).
            Each side defaults on its own, as in diffusers: height=64 alone gives 64 x the default width.
        seed (an int in [0, 2**64)) or generator: the noise source (both: error). generator may be a list,
            one per image (prompt-major, num_images_per_prompt each), as in diffusers: image i's noise then
            comes from generator i alone, so it does not depend on the rest of the batch.
        sampler: "ddim" (eta-DDIM) or "euler".
        s_policy / s_fixed / eta: see SamplerConfig. fast: the compiled / graphed step (False: the
        plain eager sampler loop, for reference). progress: a callable, called with the step index after
        each step (on both paths).
        num_images_per_prompt: images per prompt, prompt-major (prompt 0's images first); with a seed or one
            generator, the noise of all of them comes from one draw, so prompt 0's images depend on the batch.
        output_type "latent": `images` is the (B, C, h, w) latents tensor itself (no decode).
        negative_prompt: one prompt, or one per prompt, whose encoding replaces the null prompt's in CFG's
            unconditional branch (as in diffusers); it needs CFG (guidance not None or 1).
        callback_on_step_end: diffusers' callback_on_step_end(pipe, step_index, timestep, callback_kwargs)
            -> dict, called after each step (on both paths) with timestep the step's start time t_k in [0, 1]
            (a 0-d tensor) and callback_kwargs {name: tensor} for the names in
            callback_on_step_end_tensor_inputs (["latents"]); a "latents" in the dict it returns replaces
            the latents the next step starts from.
        Prompts longer than the text encoders take (the config's t5_max_length T5 tokens, clip_max_length
        CLIP tokens, EOS included) are truncated to that length, as in diffusers; a UserWarning names them.
        With a closed-vocabulary T5 (ShapesEval's), a UserWarning names the words it does not know.
        """
        prompts = check_prompt(prompt)
        steps, num_inference_steps, guidance, guidance_scale, height, width, seed, s_fixed, eta = plain_numbers(
            steps, num_inference_steps, guidance, guidance_scale, height, width, seed, s_fixed, eta
        )
        (num_images_per_prompt,) = plain_numbers(num_images_per_prompt)
        config = self._sampler_config(
            steps, num_inference_steps, guidance, guidance_scale, sampler, s_policy, s_fixed, eta
        )
        height, width = self._resolve_size(height, width)
        self._check_size(height, width)
        check_choice("output_type", output_type, OUTPUT_TYPES)
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        self._check_limits(len(prompts), num_images_per_prompt, height, width, config.steps)
        generator = self._generator(seed, generator, len(prompts) * num_images_per_prompt)
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be a bool, got {fast!r}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable taking the step index, got {type(progress).__name__}")
        tensor_inputs = check_step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        negatives = None
        if negative_prompt is not None:
            negatives = check_prompt(negative_prompt, "negative_prompt")
            if len(negatives) not in (1, len(prompts)):
                raise ValueError(
                    f"negative_prompt must be one prompt or one per prompt ({len(prompts)}), got {len(negatives)}"
                )
            if config.guidance is None:
                raise ValueError("negative_prompt needs CFG: pass a guidance other than None and 1")
            warn_truncated(self.text_encoders, negatives, "negative_prompt")
            warn_unknown_words(self.text_encoders, negatives, "negative_prompt")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        warn_truncated(self.text_encoders, prompts)
        warn_unknown_words(self.text_encoders, prompts)

        self.components.prepare(self.device)  # once per device: compiled parts, the compile cache
        clock = StageTimings(self.device)
        clock.start("end_to_end")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negatives is not None:
            negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        batch, guided = len(prompts), config.guidance is not None
        with clock("text_encoder"):
            cond, null = self.encode_prompts(prompts, guided, negatives)
        latent_shape = self._latent_shape(height, width)
        noise = draw_noise((batch, *latent_shape), generator, self.device)
        step_noise = _on(generator, noise)
        replay = fork_generators(step_noise)  # the same per-step noise again, should the output not be finite
        patch = self.model.config.patch_size
        num_tokens = (latent_shape[1] // patch) * (latent_shape[2] // patch)
        on_step_end = None if callback_on_step_end is None else step_end_hook(self, callback_on_step_end, tensor_inputs)
        progress = counted_progress(self.progress_bar(config.steps), progress)  # closes the bar at the last step
        if fast:
            warm = self.fast.is_warm(noise, cond, guided, config.method, config.kernel_backend)
            if not warm and self.fast.prepares(noise.device):
                with clock("warmup"), fp8_autocast_context(self.fp8):
                    self.fast.warmup(noise, cond, null, config.method, config.kernel_backend)
            with clock("denoise"), fp8_autocast_context(self.fp8):
                latents = self.fast.sample(noise, cond, null, config, num_tokens, step_noise, progress, on_step_end)
        else:
            with clock("denoise"), fp8_autocast_context(self.fp8):
                latents = sample(self.model, noise, cond, null, config, num_tokens, step_noise, progress, on_step_end)
        find_step = functools.partial(self._first_nonfinite_step, noise, cond, null, config, num_tokens, replay)
        if output_type == "latent":
            nonfinite = self._nonfinite(latents, None, find_step, config.steps)
            clock.stop("end_to_end")
            return SelfEPipelineOutput(images=latents, latents=latents, timings=clock, nonfinite=nonfinite)
        with clock("decode"):
            images = self.decode(latents)
        nonfinite = self._nonfinite(latents, images, find_step, config.steps)
        clock.stop("end_to_end")
        return SelfEPipelineOutput(
            images=_convert(images, output_type), latents=latents, timings=clock, nonfinite=nonfinite
        )

    def _nonfinite(self, latents: Tensor, images: Tensor | None, find_step, steps: int) -> str | None:
        """None when the output is finite (one host sync); else a NonFiniteOutputWarning, and its text."""
        message = nonfinite_message(latents, images, find_step, steps)
        if message is not None:
            message = f"model {self.model.config.name!r}: {message}; such pixels come out black"
            # _nonfinite < __call__ < torch.no_grad's wrapper < _serialized < the caller
            warnings.warn(message, NonFiniteOutputWarning, stacklevel=5)
        return message

    def _first_nonfinite_step(self, noise, cond, null, config, num_tokens, generator) -> int | None:
        with fp8_autocast_context(self.fp8):
            return first_nonfinite_step(self.model, noise, cond, null, config, num_tokens, generator)

    # ------------------------------------------------------------------------------------------
    # Validation

    def _sampler_config(
        self,
        steps: int | None,
        num_inference_steps: int | None,
        guidance: Any,
        guidance_scale: Any,
        sampler: str | None,
        s_policy: str | None,
        s_fixed: float | None,
        eta: float | None,
    ) -> SamplerConfig:
        defaults = self.sampler_defaults
        steps = _alias("steps", steps, None, "num_inference_steps", num_inference_steps)
        steps = defaults.steps if steps is None else steps
        check_int("steps", steps, 1)
        guidance = _alias("guidance", guidance, ..., "guidance_scale", guidance_scale)
        guidance = defaults.guidance if guidance is ... else guidance
        # omega < 0 would push away from the prompt: a typo, not a setting (0 is unconditional, 1 is no CFG)
        if guidance is not None and (problem := guidance_problem(guidance)) is not None:
            raise ValueError(f"guidance {problem}, or None (no CFG), got {guidance!r}")
        method = defaults.method if sampler is None else sampler
        check_choice("sampler", method, METHODS)
        policy = defaults.s_policy if s_policy is None else s_policy
        check_choice("s_policy", policy, S_POLICIES)
        s_fixed = defaults.s_fixed if s_fixed is None else s_fixed
        if isinstance(s_fixed, bool) or not isinstance(s_fixed, (int, float)) or not 0.0 <= s_fixed <= 1.0:
            raise ValueError(f"s_fixed must be a number in [0, 1], got {s_fixed!r}")
        eta = defaults.eta if eta is None else eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        return SamplerConfig(
            steps=steps,
            method=method,
            eta=float(eta),
            guidance=float(guidance) if runs_cfg(guidance) else None,
            s_policy=policy,
            s_fixed=float(s_fixed),
            time_shift=defaults.time_shift,
            kernel_backend=defaults.kernel_backend,
        )

    def _check_limits(self, prompts: int, per_prompt: int, height: int, width: int, steps: int) -> None:
        images = prompts * per_prompt
        self.limits.check_images(images, f"{prompts} prompt{'s' * (prompts != 1)} x num_images_per_prompt={per_prompt}")
        self.limits.check_tokens(images, height, width, self.size_multiple)
        self.limits.check_steps(steps)

    def _resolve_size(self, height: Any, width: Any) -> tuple[Any, Any]:
        default_height, default_width = self.default_size
        return (default_height if height is None else height), (default_width if width is None else width)

    def _check_size(self, height: Any, width: Any) -> None:
        for name, value in (("height", height), ("width", width)):
            error = side_error(
                name, value, self.autoencoder.downsample_factor, self.model.config.patch_size, self.max_size
            )
            if error:
                raise ValueError(error)

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.autoencoder.downsample_factor
        return (self.model.config.in_channels, height // f, width // f)

    def _generator(self, seed: Any, generator: Any, batch: int) -> torch.Generator | list[torch.Generator]:
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if isinstance(generator, (list, tuple)):
            bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
            if bad:
                raise TypeError(f"generator list must hold torch.Generators only, got {', '.join(sorted(set(bad)))}")
            if len(generator) != batch:
                raise ValueError(
                    f"a list of generators needs one per image: got {len(generator)} for {batch} images "
                    "(prompts x num_images_per_prompt)"
                )
            return list(generator)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}"
                )
            return generator
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        check_int("seed", seed, 0)
        if seed >= 2**64:  # torch.Generator.manual_seed takes 64 bits
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        return torch.Generator(device=self.device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Small helpers


def runs_cfg(guidance: float | None) -> bool:
    """Whether a call with this omega runs the unconditional branch. Omega 1 is the conditional prediction
    exactly (EP-CFG adds (omega - 1)(v_c - v_u), and the renorm of v_c is v_c), so it runs unguided: one
    forward per step instead of a doubled batch (diffusers skips CFG at guidance_scale 1 too)."""
    return guidance is not None and guidance != 1


def resolve_fp8(fp8: str | FP8Config) -> FP8Config:
    """The pipeline's `fp8=` argument as an FP8Config: a recipe name ("none", "torchao", "te") or a config."""
    if isinstance(fp8, FP8Config):
        return fp8
    if isinstance(fp8, str):
        return FP8Config(recipe=fp8)  # validates the name
    raise TypeError(f"fp8 must be 'none', 'torchao', 'te' or an FP8Config, got {type(fp8).__name__}")


def _alias(name: str, value: Any, unset: Any, alias: str, alias_value: Any) -> Any:
    if alias_value is unset:
        return value
    if value is not unset and value != alias_value:
        raise ValueError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree; pass one")
    return alias_value


def _on(generator: torch.Generator | list[torch.Generator], like: Tensor) -> torch.Generator | list[torch.Generator]:
    """The generator (or each of a list) for per-step noise, on the latents' device: drawing there needs no
    host-to-device copy each step."""
    if isinstance(generator, list):
        return [_on(g, like) for g in generator]
    if generator.device.type == like.device.type:
        return generator
    # A CPU generator with CUDA latents: derive a device generator deterministically from it.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device=like.device).manual_seed(seed)


def _convert(images: Tensor, output_type: str) -> Any:
    """(B, 3, H, W) in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu()
    if output_type == "np":
        return array.numpy()
    from PIL import Image

    pixels = (array * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]
