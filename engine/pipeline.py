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
                                  SpaceToDepthConfig fields}              (selfe.pixel_autoencoder)
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
`selfe.graphs` (one compiled, CUDA-graph-captured step for every step count) or eagerly, and decodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selfe.autoencoder import AutoEncoder, load_autoencoder
from selfe.config import MMDiTConfig
from selfe.fp8 import FP8Config, convert_for_inference, fp8_autocast_context
from selfe.graphs import FastPathConfig, FastSampler
from selfe.model import MMDiT
from selfe.pipeline_files import (
    AE_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    read_pipeline_config,
    required_file,
    text_encoder_dirs,
)
from selfe.pixel_autoencoder import SpaceToDepthAutoEncoder, SpaceToDepthConfig
from selfe.sampler import METHODS, S_POLICIES, SamplerConfig, sample
from selfe.text_encoders import TextEncoders, resolve_device, resolve_dtype
from selfe.weights import load_safetensors_into

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
MAX_SIZE = 4096  # pixels per side accepted by default; RoPE has no hard limit, memory has
DEFAULT_SIZE = 512  # pixels per side when neither the call nor the pipeline's config gives one
AUTOENCODERS = (AutoEncoder, SpaceToDepthAutoEncoder)


@dataclass
class SelfEPipelineOutput:
    """images: list of PIL images ("pil"), a (B, 3, H, W) tensor in [0, 1] ("pt"), a (B, H, W, 3) float
    array ("np"), or the (B, C, h, w) latents ("latent"). latents: the sampled latents, always.
    timings: seconds per stage (text_encoder, warmup, denoise, decode)."""

    images: Any
    latents: Tensor
    timings: dict[str, float] = field(default_factory=dict)


class SelfEPipeline:
    """Text encoders + dual-time MMDiT + autoencoder, sampled at any step count."""

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
    ):
        """autoencoder: the FLUX-architecture AutoEncoder (latent models) or the weightless
        SpaceToDepthAutoEncoder (pixel-space models).
        text_encoders: a TextEncoders or anything with encode(prompts) and null_condition(batch, length).
        fast_path: None runs the compiled / graphed step with default settings; pass
        FastPathConfig(compile=False, cuda_graph="off") for a plain eager step.
        fp8: "none", "torchao", "te" or an FP8Config: the model's large linears are converted in place for
        FP8 sampling here, after its weights are loaded and before the step is ever compiled.
        default_resolution: the image side used when a call omits height / width (None: 512)."""
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
        _check_text_widths(text_encoders, model.config)
        self.fp8 = resolve_fp8(fp8)
        self.model = convert_for_inference(model.eval().requires_grad_(False), self.fp8)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.text_encoders = text_encoders
        self.sampler_defaults = sampler_defaults or SamplerConfig()
        self.fast = FastSampler(self.model, fast_path)
        self.max_size = max_size
        if default_resolution is not None:
            try:
                self._check_size(default_resolution, default_resolution)
            except ValueError as err:
                raise ValueError(f"default_resolution={default_resolution!r} is not a valid size: {err}") from err
        self.default_resolution = default_resolution

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
    ) -> SelfEPipeline:
        """Load a pipeline directory (layout in the module docstring) from local files only.

        torch_dtype: of the MMDiT and the autoencoder (default bf16 on CUDA, fp32 on CPU);
        text_encoder_dtype: of T5 and CLIP (default: torch_dtype).
        autoencoder_path: the FLUX autoencoder's weights (default DIR/ae.safetensors); an error with a
        "space_to_depth" autoencoder, which has none.
        fp8: "none", "torchao", "te" or an FP8Config (see `__init__`); the file stays high precision.
        The config's "resolution" becomes `default_resolution`.
        """
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"pipeline directory {str(root)!r} does not exist; expected {MODEL_FILE} + {CONFIG_FILE} "
                "(as the trainer exports them) and the autoencoder and text encoders"
            )
        device = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, device)
        meta = read_pipeline_config(root)

        with torch.device("meta"):
            model = MMDiT(meta["model"])
        load_safetensors_into(model, required_file(root / MODEL_FILE, "model weights"), device=device, dtype=dtype)

        autoencoder = _load_autoencoder(root, meta["autoencoder"], autoencoder_path, device, dtype)
        t5_dir, t5_tok, clip_dir, clip_tok = text_encoder_dirs(root, t5_path, clip_path)
        text = meta["text"]
        text_encoders = TextEncoders.from_snapshots(
            t5_dir,
            clip_dir,
            t5_tokenizer_path=t5_tok,
            clip_tokenizer_path=clip_tok,
            device=device,
            dtype=text_encoder_dtype or dtype,
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
        )

    # ------------------------------------------------------------------------------------------
    # Properties

    @property
    def device(self) -> torch.device:
        return self.model.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.img_in.weight.dtype

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: autoencoder downsampling x patch size (16 for FLUX)."""
        return self.autoencoder.downsample_factor * self.model.config.patch_size

    # ------------------------------------------------------------------------------------------
    # Stages

    def encode_prompts(self, prompts: list[str], guided: bool) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """cond {"txt": (B, Lt, d), "txt_mask": (B, Lt), "pooled": (B, d_clip)} and the null condition
        (the cached encoding of "", same Lt) or None without guidance."""
        cond = self.text_encoders.encode(prompts)
        null = self.text_encoders.null_condition(len(prompts), cond["txt"].shape[1]) if guided else None
        to_model = lambda c: {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in c.items()}
        return to_model(cond), (None if null is None else to_model(null))

    def warmup(
        self,
        batch: int,
        height: int | None = None,
        width: int | None = None,
        guidance: bool = True,
        sampler: str = "ddim",
    ) -> float:
        """Compile (and on CUDA capture) the step for `batch` images of height x width; returns seconds.

        batch counts images, not prompts x images. height / width None: `default_resolution` (else 512).
        The first call of a new shape does this by itself.
        """
        _check_int("batch", batch, 1)
        height, width = self._resolve_size(height, width)
        self._check_size(height, width)
        _check_choice("sampler", sampler, METHODS)
        cond, null = self.encode_prompts([""] * batch, guided=guidance)
        x = torch.zeros(batch, *self._latent_shape(height, width), device=self.device)
        with fp8_autocast_context(self.fp8):
            return self.fast.warmup(x, cond, null, sampler, self.sampler_defaults.kernel_backend)

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

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        steps: int | None = None,
        guidance: float | None = ...,  # type: ignore[assignment]
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
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
    ) -> SelfEPipelineOutput:
        """Generate images for one prompt or a list.

        steps (alias num_inference_steps): any count >= 1, default from the pipeline's config (2).
        guidance (alias guidance_scale): omega >= 0 of energy-preserving CFG; None: no CFG; default the
            pipeline's config (the training run's export_guidance; the shipped ShapesEval model has none).
        height / width: pixels, multiples of `size_multiple`; None: `default_size` (the config's resolution).
        seed or generator: the noise source (both: error). sampler: "ddim" (eta-DDIM) or "euler".
        s_policy / s_fixed / eta: see SamplerConfig. fast: the compiled / graphed step (False: the
        plain eager sampler loop, for reference). progress: called with the step index after each step.
        """
        prompts = _check_prompt(prompt)
        config = self._sampler_config(
            steps, num_inference_steps, guidance, guidance_scale, sampler, s_policy, s_fixed, eta
        )
        height, width = self._resolve_size(height, width)
        self._check_size(height, width)
        _check_choice("output_type", output_type, OUTPUT_TYPES)
        _check_int("num_images_per_prompt", num_images_per_prompt, 1)
        generator = self._generator(seed, generator)
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be a bool, got {fast!r}")

        timings: dict[str, float] = {}
        clock = _Clock(self.device, timings)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch, guided = len(prompts), config.guidance is not None
        with clock("text_encoder"):
            cond, null = self.encode_prompts(prompts, guided)
        latent_shape = self._latent_shape(height, width)
        noise = torch.randn((batch, *latent_shape), generator=generator, device=generator.device)
        noise = noise.to(self.device)
        patch = self.model.config.patch_size
        num_tokens = (latent_shape[1] // patch) * (latent_shape[2] // patch)
        if fast:
            if not self.fast.is_warm(noise, cond, guided, config.method, config.kernel_backend):
                with clock("warmup"), fp8_autocast_context(self.fp8):
                    self.fast.warmup(noise, cond, null, config.method, config.kernel_backend)
            with clock("denoise"), fp8_autocast_context(self.fp8):
                latents = self.fast.sample(noise, cond, null, config, num_tokens, _on(generator, noise), progress)
        else:
            with clock("denoise"), fp8_autocast_context(self.fp8):
                latents = sample(self.model, noise, cond, null, config, num_tokens, _on(generator, noise))
            if progress is not None:
                for k in range(config.steps):
                    progress(k)
        if output_type == "latent":
            return SelfEPipelineOutput(images=latents, latents=latents, timings=timings)
        with clock("decode"):
            images = self.decode(latents)
        return SelfEPipelineOutput(images=_convert(images, output_type), latents=latents, timings=timings)

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
        _check_int("steps", steps, 1)
        guidance = _alias("guidance", guidance, ..., "guidance_scale", guidance_scale)
        guidance = defaults.guidance if guidance is ... else guidance
        if guidance is not None:
            # omega < 0 would push away from the prompt: a typo, not a setting (0 is unconditional, 1 is no CFG)
            if (
                isinstance(guidance, bool)
                or not isinstance(guidance, (int, float))
                or not math.isfinite(guidance)
                or guidance < 0
            ):
                raise ValueError(f"guidance must be a finite number >= 0 or None (no CFG), got {guidance!r}")
        method = defaults.method if sampler is None else sampler
        _check_choice("sampler", method, METHODS)
        policy = defaults.s_policy if s_policy is None else s_policy
        _check_choice("s_policy", policy, S_POLICIES)
        s_fixed = defaults.s_fixed if s_fixed is None else s_fixed
        if not isinstance(s_fixed, (int, float)) or not 0.0 <= s_fixed <= 1.0:
            raise ValueError(f"s_fixed must be a number in [0, 1], got {s_fixed!r}")
        eta = defaults.eta if eta is None else eta
        if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        return SamplerConfig(
            steps=steps,
            method=method,
            eta=float(eta),
            guidance=None if guidance is None else float(guidance),
            s_policy=policy,
            s_fixed=float(s_fixed),
            time_shift=defaults.time_shift,
            kernel_backend=defaults.kernel_backend,
        )

    def _resolve_size(self, height: Any, width: Any) -> tuple[Any, Any]:
        default_height, default_width = self.default_size
        return (default_height if height is None else height), (default_width if width is None else width)

    def _check_size(self, height: Any, width: Any) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            _check_int(name, value, m)
            if value % m or value > self.max_size:
                raise ValueError(
                    f"{name} must be a multiple of {m} (autoencoder {self.autoencoder.downsample_factor}x "
                    f"down, {self.model.config.patch_size}x{self.model.config.patch_size} patches) "
                    f"between {m} and {self.max_size}, got {value}"
                )

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.autoencoder.downsample_factor
        return (self.model.config.in_channels, height // f, width // f)

    def _generator(self, seed: Any, generator: Any) -> torch.Generator:
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            return generator
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        _check_int("seed", seed, 0)
        return torch.Generator(device=self.device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Small helpers


def _load_autoencoder(
    root: Path,
    config: Any,
    autoencoder_path: str | Path | None,
    device: torch.device,
    dtype: torch.dtype,
) -> AutoEncoder | SpaceToDepthAutoEncoder:
    """The pipeline's autoencoder: built directly when weightless, else loaded from ae.safetensors."""
    if isinstance(config, SpaceToDepthConfig):
        if autoencoder_path is not None:
            raise ValueError(
                f"autoencoder_path={str(autoencoder_path)!r} given, but the pipeline's autoencoder is "
                "'space_to_depth', which has no weights"
            )
        return SpaceToDepthAutoEncoder(config).to(device).eval()
    ae_file = Path(autoencoder_path) if autoencoder_path is not None else root / AE_FILE
    return load_autoencoder(
        required_file(ae_file, "autoencoder weights (pass autoencoder_path=)"), config, device=device, dtype=dtype
    )


def resolve_fp8(fp8: str | FP8Config) -> FP8Config:
    """The pipeline's `fp8=` argument as an FP8Config: a recipe name ("none", "torchao", "te") or a config."""
    if isinstance(fp8, FP8Config):
        return fp8
    if isinstance(fp8, str):
        return FP8Config(recipe=fp8)  # validates the name
    raise TypeError(f"fp8 must be 'none', 'torchao', 'te' or an FP8Config, got {type(fp8).__name__}")


def _check_text_widths(text_encoders: Any, config: MMDiTConfig) -> None:
    t5, clip = getattr(text_encoders, "t5", None), getattr(text_encoders, "clip", None)
    if t5 is not None and t5.width != config.txt_dim:
        raise ValueError(f"the T5 encoder's width is {t5.width}, the model expects txt_dim={config.txt_dim}")
    if clip is not None and clip.width != config.vec_dim:
        raise ValueError(f"the CLIP encoder's width is {clip.width}, the model expects vec_dim={config.vec_dim}")


def _check_prompt(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    for i, p in enumerate(prompt):
        if not isinstance(p, str):
            raise TypeError(f"prompt[{i}] must be a string, got {type(p).__name__}")
    return list(prompt)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _alias(name: str, value: Any, unset: Any, alias: str, alias_value: Any) -> Any:
    if alias_value is unset:
        return value
    if value is not unset and value != alias_value:
        raise ValueError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree; pass one")
    return alias_value


def _on(generator: torch.Generator, like: Tensor) -> torch.Generator | None:
    """The generator for per-step noise: it must live on the latents' device."""
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


class _Clock:
    """`with clock("stage"):` adds the stage's wall time (device synchronised) to timings."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings = device, timings

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
