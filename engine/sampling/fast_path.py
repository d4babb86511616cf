"""The fast sampling path: one denoising step compiled once and, on CUDA, captured in a CUDA graph per shape.

Self-E's point is that one network serves every step budget; this module's point is that one captured
step serves every step count. `selfe.sampling.sampler.denoise_step` takes every per-step scalar (t_k, t_{k+1},
s_k, omega, eta) and the step's fresh noise as tensors, so:

- torch.compile (`dynamic=False`, `fullgraph=True`) traces it once per shape; a new t, s or guidance
  value is new tensor data, not a new graph (tests run with `error_on_recompile`).
- On CUDA the compiled step is captured in a `torch.cuda.CUDAGraph` per `StepKey` (batch, latent size,
  text length, guided or not, method, dtype) with static input tensors. A sampling call copies its
  scalars and noise into them and replays the same graph 1, 2, 4, 8, 50 or any number of times.
- All graphs share one memory pool. That is safe because graphs replay one at a time and nothing a
  graph writes is read after another graph ran: `FastSampler.sample` returns a copy of the result.
- The model's host-syncing value checks are off inside the step (`validate=False` per call), so the
  step has no host sync; the pipeline validates its inputs before any device work instead.

On CPU there is no graph: the step runs directly, eager by default (`compile="auto"` compiles on CUDA
only) or compiled with `compile=True`. Either way
`FastSampler.sample` draws the same noise from the generator, in the same order, as the eager
`selfe.sampling.sampler.sample`, so both paths give the same images for the same seed.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfe.kernels.dispatch import get_op
from selfe.method.schedule import sampling_grid
from selfe.sampling.sampler import Generators, SamplerConfig, StepEnd, denoise_step, draw_noise, s_grid
from selfe.utils.compiling import recompile_limits

CUDA_GRAPH_MODES = ("auto", "on", "off")
# torch.compile modes a FastPathConfig accepts (the two that capture CUDA graphs themselves are refused).
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
# What changes from one step to the next of a sampling call; the rest is copied into a graph once per call.
PER_STEP_INPUTS = ("x", "t_cur", "t_next", "s_cur", "noise")


@dataclass
class FastPathConfig:
    """How the step runs. `compile`: torch.compile the step: True, False, or "auto" (on CUDA only: on a
    CPU inductor's C++ build of a step takes minutes, more than most CPU sampling runs save);
    `cuda_graph`: "auto" (on CUDA devices),
    "on" (error if impossible) or "off"; `compile_backend` / `compile_mode`: passed to torch.compile
    (mode "reduce-overhead" would add inductor's own CUDA graphs on top of ours, so it is refused);
    `graph_warmup_iters`: eager runs on a side stream before capture (allocator and autotuning settle);
    `max_compiled_shapes`: how many StepKeys the compiled step serves (each is a trace of its own; dynamo's
    recompile limit, 8 by default and a hard error under fullgraph, is raised to match while the step
    runs). Past it a new shape runs the uncompiled step (still graph-captured on CUDA), with a warning.
    `text_bucket`: the pipeline cuts the text tokens it feeds the denoiser to the smallest of text_bucket,
    2x, 4x, ... (at most the encoder's padded length) that holds the call's longest prompt, null and
    negative prompts included. Exact: padded text is left out as attention keys (each row's real length is
    tensor data: another prompt length in the bucket reuses the step) and text sits at RoPE position 0, so
    only the cost changes (a short prompt at T5's 512: a 2b step at 512² drops from 1536
    tokens to 1088, and T5 encodes 64 tokens, `TextEncoders.encode(bucket=...)`). Each bucket is a shape of
    its own (compiled, captured); None keeps the encoder's length.
    `compile_regions`: compile each block of the network (an MMDiT's `compile_regions`) as a nested compile
    region, traced once per block kind and reused for the rest: a shorter compile of a deep stack (2.1x on
    a CPU, bench/compile_time.py). If the compiler fails on it, the step is compiled whole, with a warning.

    The parts around the step (`selfe.sampling.fast_components`), each True, False or "auto":
    `compile_text_encoder`: T5 and CLIP compiled at static shapes, one trace per (batch, text bucket);
    `compile_decoder`: the FLUX decoder compiled, one trace per latent shape (tiles of `tiled_decode` share
    one); `decoder_channels_last`: its weights and activations in channels-last (NHWC) memory format, the
    convolutions' fast layout on GPUs. "auto": on CUDA when the step is compiled (channels-last: when the
    decoder is); on a CPU off (inductor's C++ build of T5 takes minutes there). All use `compile_backend` /
    `compile_mode`, and each serves at most `max_compiled_shapes` shapes.
    `prompt_cache_size`: recent prompts whose encodings are kept (0: off, or what a TextEncoders was built
    with; `selfe.components.encoding_cache`); the null prompt and a few negative prompts are kept always.
    T5 then runs on the prompts it lacks only, so its compiled shapes are (new prompts, text bucket).
    `compile_cache`: torch.compile's artifacts saved by `SelfEPipeline.warmup` and loaded by a fresh process
    before its first compile (`selfe.sampling.compile_cache`), in `compile_cache_dir` (None: the folder
    $SELFE_COMPILE_CACHE, else ~/.cache/selfe/compile), under a sub-folder per torch version. "auto": on
    CUDA with the inductor backend, when the step is compiled. The folder must be trusted like code."""

    compile: bool | str = "auto"
    cuda_graph: str = "auto"
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    graph_warmup_iters: int = 2
    max_compiled_shapes: int = 64
    text_bucket: int | None = 64
    compile_regions: bool = True
    compile_text_encoder: bool | str = "auto"
    compile_decoder: bool | str = "auto"
    decoder_channels_last: bool | str = "auto"
    prompt_cache_size: int = 0
    compile_cache: bool | str = "auto"
    compile_cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        # `1 in (True, False, "auto")` holds in Python, so the bool check is by type.
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ValueError(f"FastPathConfig.compile must be True, False or 'auto', got {self.compile!r}")
        if not isinstance(self.cuda_graph, str) or self.cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"FastPathConfig.cuda_graph must be one of {CUDA_GRAPH_MODES}, got {self.cuda_graph!r}")
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"FastPathConfig.compile_mode={self.compile_mode!r} captures its own CUDA graphs; use None, "
                "'default' or 'max-autotune-no-cudagraphs' (the step is captured by selfe.sampling.fast_path)"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"FastPathConfig.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        _check_compile_backend(self.compile_backend)
        warmup = self.graph_warmup_iters
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"FastPathConfig.graph_warmup_iters must be an integer >= 1, got {warmup!r}")
        shapes = self.max_compiled_shapes
        if isinstance(shapes, bool) or not isinstance(shapes, int) or shapes < 1:
            raise ValueError(f"FastPathConfig.max_compiled_shapes must be an integer >= 1, got {shapes!r}")
        bucket = self.text_bucket
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
            raise ValueError(f"FastPathConfig.text_bucket must be an integer >= 1 or None, got {bucket!r}")
        if not isinstance(self.compile_regions, bool):
            raise ValueError(f"FastPathConfig.compile_regions must be a bool, got {self.compile_regions!r}")
        for name in ("compile_text_encoder", "compile_decoder", "decoder_channels_last", "compile_cache"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or value == "auto"):
                raise ValueError(f"FastPathConfig.{name} must be True, False or 'auto', got {value!r}")
        size = self.prompt_cache_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"FastPathConfig.prompt_cache_size must be an integer >= 0, got {size!r}")
        folder = self.compile_cache_dir
        if folder is not None and (not isinstance(folder, (str, os.PathLike)) or not str(folder)):
            raise ValueError(f"FastPathConfig.compile_cache_dir must be a folder path or None, got {folder!r}")


# What a failed compile raises (a trace dynamo refuses under fullgraph, a region it cannot capture whole, a
# backend that fails on the graph): all of dynamo's own exceptions derive from this one.
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException,)


def _check_compile_backend(backend: Any) -> None:
    """A torch.compile backend: a callable, or the name of a registered one. Looking a name up imports
    torch._dynamo (about a second), so the default "inductor" is taken on trust."""
    if callable(backend) or backend == "inductor":
        return
    if not isinstance(backend, str) or not backend:
        raise ValueError(
            f"FastPathConfig.compile_backend must be a torch.compile backend name or callable, got {backend!r}"
        )
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"FastPathConfig.compile_backend {backend!r} is not a torch.compile backend; known: {known}")


class _Unchecked(nn.Module):
    """The network with its host-syncing value checks off (shape checks stay: they cost nothing)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Any) -> Tensor:
        return self.net(x, t, s, cond, validate=False)


@dataclass(frozen=True)
class StepKey:
    """What a compiled graph and a CUDA graph depend on; everything else is tensor data."""

    batch: int
    latent_shape: tuple[int, ...]  # (C, h, w)
    txt_len: int
    guided: bool
    method: str
    dtype: torch.dtype
    device: str
    kernel_backend: str | None


def step_key(
    x: Tensor, cond: Mapping[str, Tensor], guided: bool, method: str, kernel_backend: str | None = "auto"
) -> StepKey:
    """The key of a step on latents x: (B, C, h, w) with condition cond (txt: (B, Lt, d))."""
    return StepKey(
        batch=x.shape[0],
        latent_shape=tuple(x.shape[1:]),
        txt_len=int(cond["txt"].shape[1]),
        guided=guided,
        method=method,
        dtype=x.dtype,
        device=str(x.device),
        kernel_backend=kernel_backend,
    )


class _GraphedStep:
    """One CUDA graph of the step with its static inputs; `run` copies inputs in and replays."""

    @staticmethod
    def new_pool() -> Any:
        return torch.cuda.graph_pool_handle()

    def __init__(self, step, args: dict[str, Any], pool: Any, warmup_iters: int):
        # Static inputs: fresh tensors outside the pool, written before every replay.
        self.static = {name: _clone_tree(value) for name, value in args.items()}
        self.step = step
        self.out = self._capture(pool, warmup_iters)

    def _capture(self, pool: Any, warmup_iters: int) -> Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup_iters):  # compiles (first time) and settles allocations off the graph
                self.step(**self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            out = self.step(**self.static)
        return out

    def replay(self) -> None:
        self.graph.replay()

    def run(self, args: dict[str, Any], names: tuple[str, ...] | None = None) -> Tensor:
        """Copy args (only `names` of them, when given) into the static inputs, replay; the static output."""
        for name, value in args.items():
            if names is None or name in names:
                _copy_tree(self.static[name], value)
        self.replay()
        return self.out


class FastSampler:
    """Any-step sampling with one compiled (and, on CUDA, graph-captured) step per shape.

    net: the dual-time network (MMDiT), called as net(x, t, s, cond, validate=...).
    """

    graph_class = _GraphedStep  # tests swap in a CPU stand-in that re-runs the step on replay

    def __init__(self, net: nn.Module, config: FastPathConfig | None = None):
        if config is not None and not isinstance(config, FastPathConfig):
            raise TypeError(f"fast_path must be a FastPathConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else FastPathConfig()
        self.net = net
        self._unchecked = _Unchecked(net)
        self._compiled = None
        self._limits: dict[str, int] = {}  # dynamo's limits while the compiled step runs (_recompile_limits)
        self._compiled_keys: set[StepKey] = set()  # the shapes the compiled step was traced for
        self._uncompiled_keys: set[StepKey] = set()  # shapes past max_compiled_shapes (warned once each)
        self._graphs: dict[StepKey, _GraphedStep] = {}
        self._warm: set[StepKey] = set()  # compiled (and captured, on CUDA) already
        self._pool = None
        self._prepared: set[str] = set()  # device types the net was bound to
        self.capture_seconds: dict[StepKey, float] = {}

    # ------------------------------------------------------------------------------------------
    # The step

    def _eager_step(self, **kwargs: Any) -> Tensor:
        return denoise_step(self._unchecked, **kwargs)

    def compiles(self, device: torch.device) -> bool:
        """Whether the step is compiled on `device` (config.compile, "auto" resolved)."""
        if self.config.compile == "auto":
            return device.type == "cuda"
        return bool(self.config.compile)

    def _step_fn(self, key: StepKey, device: torch.device):
        """The step for `key`: compiled (while fewer than max_compiled_shapes keys are) or eager."""
        if device.type not in self._prepared:
            # A model loaded with assign=True binds its kernels on its first forward, which inside a
            # compiled region would guard on the unbound state and recompile on the second call. A
            # same-device .to() binds them now and copies nothing.
            self.net.to(device)
            self._prepared.add(device.type)
        if not self.compiles(device):
            return self._eager_step
        if key not in self._compiled_keys:
            if len(self._compiled_keys) >= self.config.max_compiled_shapes:
                if key in self._uncompiled_keys:
                    return self._eager_step
                self._uncompiled_keys.add(key)
                warnings.warn(
                    f"the compiled step already serves FastPathConfig.max_compiled_shapes="
                    f"{self.config.max_compiled_shapes} shapes; {key} runs uncompiled (raise the limit to compile it)",
                    UserWarning,
                    stacklevel=2,
                )
                return self._eager_step
            self._compiled_keys.add(key)
            if key.guided:  # resolved before its first trace: dynamo cannot trace the provider's import
                get_op("energy_preserving_mix", key.kernel_backend, device)
        if self._compiled is None:
            self._compiled = torch.compile(
                denoise_step,
                backend=self.config.compile_backend,
                mode=self.config.compile_mode,
                fullgraph=True,
                dynamic=False,
            )
            self._limits = self._recompile_limits()
            if hasattr(self.net, "compile_regions"):
                self.net.compile_regions = self.config.compile_regions
        compiled, limits = self._compiled, self._limits

        def run(**kwargs: Any) -> Tensor:
            # Every shape is one cache entry of the same code object; a per-call patch (~15 us) keeps
            # dynamo's global config untouched for the rest of the program.
            with torch._dynamo.config.patch(**limits):
                try:
                    return compiled(self._unchecked, **kwargs)
                except COMPILE_ERRORS as err:
                    if not getattr(self.net, "compile_regions", False):
                        raise
                    # The regions are the newer compiler path: fall back to the whole step (dynamo guards on
                    # the flag, so the next call traces anew) rather than lose the compiled step.
                    warnings.warn(
                        f"compiling the step with each block as a nested region failed ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); compiling it whole "
                        "(FastPathConfig(compile_regions=False) skips the attempt)",
                        UserWarning,
                        stacklevel=2,
                    )
                    self.net.compile_regions = False
                    return compiled(self._unchecked, **kwargs)

        return run

    def _recompile_limits(self) -> dict[str, int]:
        """Dynamo's limits raised to hold max_compiled_shapes traces (a few spare for any other guard)."""
        return recompile_limits(self.config.max_compiled_shapes)

    def prepares(self, device: torch.device) -> bool:
        """Whether a new shape has anything to prepare on `device` (a compile or a capture); a plain
        eager step has not, so the pipeline runs no warm-up step for it."""
        return self.compiles(device) or self.uses_cuda_graph(device)

    def uses_cuda_graph(self, device: torch.device) -> bool:
        mode = self.config.cuda_graph
        if mode == "off":
            return False
        if device.type != "cuda":
            if mode == "on":
                raise ValueError(f"cuda_graph='on' needs a CUDA device, the latents are on {device}")
            return False
        return True

    def _run_step(self, key: StepKey, args: dict[str, Any], first: bool = True) -> Tensor:
        """One step. first=False (CUDA graph only): the condition, guidance and eta are already in the
        graph's static inputs from this call's first step, so only x, the times and the noise are copied."""
        device = args["x"].device
        step = self._step_fn(key, device)
        if not self.uses_cuda_graph(device):
            return step(**args)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, step, args)
        return graph.run(args, None if first else PER_STEP_INPUTS)

    def _capture(self, key: StepKey, step, args: dict[str, Any]) -> _GraphedStep:
        start = time.perf_counter()
        if self._pool is None:
            self._pool = self.graph_class.new_pool()
        graph = self.graph_class(step, args, self._pool, self.config.graph_warmup_iters)
        if args["x"].is_cuda:
            torch.cuda.synchronize(args["x"].device)
        self._graphs[key] = graph
        self.capture_seconds[key] = time.perf_counter() - start
        return graph

    # ------------------------------------------------------------------------------------------
    # Public API

    def warmup(
        self,
        x: Tensor,
        cond: Mapping[str, Tensor],
        null_cond: Mapping[str, Tensor] | None,
        method: str = "ddim",
        kernel_backend: str | None = "auto",
    ) -> float:
        """Compile (and on CUDA capture) the step for x's shape ahead of time; returns the seconds spent.

        x: (B, C, h, w) example latents; cond / null_cond: example conditions of batch B (null_cond None:
        the unguided step). Values do not matter, only shapes, dtypes and the device.
        """
        b = x.shape[0]
        x, cond, null_cond = x.contiguous(), _contiguous_tree(cond), _contiguous_tree(null_cond)
        half = torch.full((b,), 0.5, device=x.device)
        args = dict(
            x=x,
            t_cur=half,
            t_next=torch.full((b,), 0.25, device=x.device),
            s_cur=half.clone(),
            cond=cond,
            null_cond=null_cond,
            guidance=None if null_cond is None else torch.full((b,), 5.0, device=x.device),
            noise=torch.zeros_like(x),
            eta=torch.full((), 1.0, device=x.device, dtype=x.dtype),
            method=method,
            kernel_backend=kernel_backend,
        )
        key = step_key(x, cond, null_cond is not None, method, kernel_backend)
        start = time.perf_counter()
        self._warm.add(key)
        with torch.no_grad():
            if self.uses_cuda_graph(x.device):
                if key not in self._graphs:
                    self._capture(key, self._step_fn(key, x.device), _static_args(args))
            else:
                self._step_fn(key, x.device)(**args)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    def is_warm(
        self, x: Tensor, cond: Mapping[str, Tensor], guided: bool, method: str, kernel_backend: str | None = "auto"
    ) -> bool:
        """Whether the step for this shape was compiled / captured already (by `warmup` or `sample`)."""
        return step_key(x, cond, guided, method, kernel_backend) in self._warm

    def forget_captures(self) -> None:
        """Drop the CUDA graphs (their memory with them) and what was bound or warmed, after the network
        moved to another device or dtype. Compiled traces stay in dynamo's cache and keep counting
        against max_compiled_shapes (a StepKey names its device and dtype, so none is reused wrongly)."""
        self._graphs.clear()
        self._warm.clear()
        self._prepared.clear()
        self.capture_seconds.clear()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """CUDA graphs captured so far (one per StepKey)."""
        return len(self._graphs)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        cond: Mapping[str, Tensor],
        null_cond: Mapping[str, Tensor] | None,
        config: SamplerConfig,
        num_tokens: int | None = None,
        generator: Generators = None,
        progress=None,
        on_step_end: StepEnd | None = None,
    ) -> Tensor:
        """Same contract and the same random draws as `selfe.sampling.sampler.sample`; returns a fresh tensor.

        progress: optional callable(k) called after step k (a progress bar's update).
        on_step_end: optional callable(k, t_k, x) -> x after step k, from the host loop between steps (never
        inside the compiled or captured step). With a CUDA graph it gets a copy of the graph's static output
        (which the next replay overwrites), and the x it returns is copied into the graph's static input.
        """
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable taking the step index, got {type(progress).__name__}")
        if config.guidance is not None and null_cond is None:
            raise ValueError("guidance is set but no null condition was given (pass null_cond or guidance=None)")
        b, device = noise.shape[0], noise.device
        cond, null_cond = _contiguous_tree(cond), _contiguous_tree(null_cond)
        t_grid = sampling_grid(config.steps, config.time_shift.mu_for(num_tokens), device=device)
        s_values = s_grid(t_grid, config.s_policy, config.s_fixed)
        guided = config.guidance is not None
        guidance = torch.full((b,), float(config.guidance), device=device) if guided else None
        eta = torch.full((), config.eta, device=device, dtype=noise.dtype)  # no host-to-device copy
        kernel_backend = config.kernel_backend
        key = step_key(noise, cond, guided, config.method, kernel_backend)
        # Per-step (B,) rows of contiguous tables: the same strides as warmup's inputs, so no recompile.
        t_cur = t_grid[:-1, None].expand(config.steps, b).contiguous()
        t_next = t_grid[1:, None].expand(config.steps, b).contiguous()
        s_cur = s_values[:, None].expand(config.steps, b).contiguous()
        x = noise
        for k in range(config.steps):
            z = draw_noise(noise.shape, generator, device, noise.dtype)
            args = dict(
                x=x,
                t_cur=t_cur[k],
                t_next=t_next[k],
                s_cur=s_cur[k],
                cond=cond,
                null_cond=null_cond if guided else None,
                guidance=guidance,
                noise=z,
                eta=eta,
                method=config.method,
                kernel_backend=kernel_backend,
            )
            if self.uses_cuda_graph(device):
                args = _static_args(args)
            x = self._run_step(key, args, first=k == 0)
            self._warm.add(key)
            if on_step_end is not None:
                x = on_step_end(k, t_grid[k], x.clone() if self.uses_cuda_graph(device) else x)
            if progress is not None:
                progress(k)
        return x.clone()


def _static_args(args: dict[str, Any]) -> dict[str, Any]:
    """Args as the graph sees them: the string arguments are baked into the capture, the rest are
    tensors (expanded views made contiguous, so a static buffer can be copied into)."""
    out = {}
    for name, value in args.items():
        if isinstance(value, Tensor):
            value = value.contiguous()
        out[name] = value
    return out


def _contiguous_tree(value: Any) -> Any:
    """A condition with every tensor contiguous (an expanded null condition becomes a real batch), so
    the compiled step sees the same strides on every call and never recompiles for them."""
    if isinstance(value, Tensor):
        return value.contiguous()
    if isinstance(value, dict):
        return {k: _contiguous_tree(v) for k, v in value.items()}
    return value


def _clone_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    return value  # strings (method, kernel backend) and None


def _copy_tree(static: Any, value: Any) -> None:
    if isinstance(static, Tensor):
        static.copy_(value)
    elif isinstance(static, dict):
        for k in static:
            _copy_tree(static[k], value[k])
    elif static != value:
        raise ValueError(f"a captured CUDA graph was built for {static!r}, got {value!r}")


__all__ = ["CUDA_GRAPH_MODES", "FastPathConfig", "FastSampler", "StepKey", "step_key"]
