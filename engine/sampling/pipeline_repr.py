"""`repr(pipe)`: what a SelfEPipeline holds and what a call does by default, one line per part. The
shipped ShapesEval model, loaded on a CPU with FastPathConfig(compile=False), prints:

    SelfEPipeline(
      model: MMDiT 'shapes', 3.00M parameters, torch.float32 on cpu
      resolution: 32x32 by default (sides a multiple of 4)
      sampler: 2 steps, ddim (eta 1, s_policy next), no CFG
      text_encoders: T5 (t5, width 64, 16 tokens, closed vocabulary of 23 words) + CLIP (width 64, 77 tokens)
      autoencoder: FLUX-architecture, 8 latent channels, 4x down
      fast_path: eager step, no CUDA graph (compile=False, cuda_graph='auto'); fp8: none
    )
"""

from __future__ import annotations

from typing import Any

from selfe.components.pixel_autoencoder import SpaceToDepthAutoEncoder
from selfe.components.vocabulary import closed_vocabulary


def pipeline_repr(pipe: Any) -> str:
    lines = [
        f"model: {_model(pipe)}",
        f"resolution: {'x'.join(map(str, pipe.default_size))} by default (sides a multiple of {pipe.size_multiple})",
        f"sampler: {_sampler(pipe.sampler_defaults)}",
        f"text_encoders: {_text_encoders(pipe.text_encoders)}",
        f"autoencoder: {_autoencoder(pipe.autoencoder)}",
        f"fast_path: {_fast_path(pipe)}; fp8: {pipe.fp8.recipe}",
    ]
    return f"{type(pipe).__name__}(\n" + "".join(f"  {line}\n" for line in lines) + ")"


def _model(pipe: Any) -> str:
    count = sum(p.numel() for p in pipe.model.parameters())
    return f"MMDiT {pipe.model.config.name!r}, {_count(count)} parameters, {pipe.dtype} on {pipe.device}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _sampler(config: Any) -> str:
    cfg = "no CFG" if config.guidance is None else f"EP-CFG omega {config.guidance:g}"
    return f"{config.steps} steps, {config.method} (eta {config.eta:g}, s_policy {config.s_policy}), {cfg}"


def _text_encoders(encoders: Any) -> str:
    t5, clip = getattr(encoders, "t5", None), getattr(encoders, "clip", None)
    if t5 is None or clip is None:
        return type(encoders).__name__
    kind = getattr(t5.model.config, "model_type", "t5")
    vocabulary = closed_vocabulary(t5)
    closed = "" if vocabulary is None else f", closed vocabulary of {len(vocabulary)} words"
    return (
        f"T5 ({kind}, width {t5.width}, {t5.max_length} tokens{closed}) + "
        f"CLIP (width {clip.width}, {clip.max_length} tokens)"
    )


def _autoencoder(autoencoder: Any) -> str:
    config = autoencoder.config
    if isinstance(autoencoder, SpaceToDepthAutoEncoder):
        kind = "space-to-depth (pixels, no weights)"
    else:
        kind = "FLUX-architecture"
    return f"{kind}, {config.z_channels} latent channels, {autoencoder.downsample_factor}x down"


def _fast_path(pipe: Any) -> str:
    fast, device = pipe.fast, pipe.device
    step = "compiled step" if fast.compiles(device) else "eager step"
    try:
        graph = "CUDA graph" if fast.uses_cuda_graph(device) else "no CUDA graph"
    except ValueError:  # cuda_graph="on" off CUDA: the first fast call will say so
        graph = "CUDA graph impossible here"
    config = fast.config
    return f"{step}, {graph} (compile={config.compile!r}, cuda_graph={config.cuda_graph!r})"
