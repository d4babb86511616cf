"""FP8 linears behind one switch: `recipe = "none" | "torchao" | "te"`, applied before parallelisation.

The converter swaps modules in place (torchtitan's pattern: build -> convert -> compile -> FSDP2):

- "torchao", training: `torchao.float8.convert_to_float8_training` turns the selected `nn.Linear`s into
  `Float8Linear`s: e4m3 inputs and weights, e5m2 output gradients, dynamic scales, bf16/fp32 weights
  kept as ordinary parameters. "tensorwise" scaling (default) also all-gathers the weights in FP8 under
  FSDP2; "rowwise" scales per row (more accurate, all-gathers in high precision).
- "torchao", sampling: float8 weights plus dynamic float8 activations via `torchao.quantization.quantize_`
  with `Float8DynamicActivationFloat8WeightConfig` where FP8 GEMMs exist (CUDA sm89+). Elsewhere (CPU)
  torchao refuses that config, so sampling uses the emulated `Float8Linear` instead: the same dynamic
  e4m3 quantisation of both operands, the GEMM emulated in high precision (weights re-cast every call).
- "te": Transformer Engine `te.Linear`s (weights copied over), run under `fp8_autocast_context(config)`
  with the current-scaling recipe (`Float8CurrentScaling`). Imported lazily; CUDA only. Our norms are
  adaLN (per-sample shift/scale from the global vector), which TE's `LayerNormLinear` cannot express,
  so no norm+linear pair is fused.

Which linears: only the large attention and MLP projections (double blocks' `*_attn.qkv`, `*_attn.proj`,
`*_mlp.0/2`; single blocks' `linear1`, `linear2`). Modulation linears (one row per sample: nothing to
gain, and their scales set every gate), the embedders and the final layer stay in high precision. The
filter is config: glob patterns on module names, excludes winning, plus a minimum size; FP8 GEMMs need
both dims to be multiples of 16, so a selected linear that is not is left alone (`fp8_plan` says why).

Checkpoints stay bf16/fp32: a torchao training model's state dict has the original keys and dtypes
(Float8Linear keeps an ordinary weight); `high_precision_state_dict` unwraps torchao's weight wrapper and
drops TE's `_extra_state`, so one checkpoint loads into either model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selfe.network.config import strict_from_dict
from selfe.utils.optional import require

FP8_RECIPES = ("none", "torchao", "te")
TORCHAO_SCALINGS = ("tensorwise", "rowwise")
FP8_DIM_MULTIPLE = 16  # FP8 GEMMs (cuBLASLt / torch._scaled_mm) need K and N divisible by 16

# Glob patterns on fully-qualified module names (fnmatch: `*` also crosses dots).
DEFAULT_INCLUDE = ("*_attn.qkv", "*_attn.proj", "*_mlp.0", "*_mlp.2", "*.linear1", "*.linear2")
DEFAULT_EXCLUDE = (
    "*_mod.lin",  # double-block modulation
    "*modulation.lin",  # single-block and final-layer modulation
    "img_in",
    "txt_in",
    "time_in.*",
    "gap_in.*",
    "vector_in.*",
    "final_layer.*",
)


@dataclass
class FP8Config:
    """Which FP8 path, with which scaling, for which linears. `recipe="none"` makes everything a no-op."""

    recipe: str = "none"
    # torchao only. "tensorwise": one scale per tensor (fastest; FP8 all-gather under FSDP2);
    # "rowwise": one scale per row of each operand, scales rounded to powers of 2 (torchao's "rowwise" recipe).
    scaling: str = "tensorwise"
    # torchao tensorwise only: FSDP2 all-gathers the FP8 weight (half the bytes of bf16). Set False when the
    # model will not be sharded: the weight wrapper it needs only pays off under FSDP2.
    fsdp_float8_all_gather: bool = True
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    # Both in_features and out_features must reach this (FP8 only pays off on large GEMMs; the presets'
    # projections are >= 1024 wide, the tiny test model's >= 64).
    min_features: int = FP8_DIM_MULTIPLE
    # torchao: emulate the FP8 GEMM in high precision. None = decide from the model's device at conversion
    # (emulate unless it is a CUDA device of compute capability >= 8.9).
    emulate: bool | None = None

    def __post_init__(self) -> None:
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)  # lists from JSON
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"FP8Config.recipe must be one of {FP8_RECIPES}, got {self.recipe!r}")
        if self.scaling not in TORCHAO_SCALINGS:
            raise ValueError(f"FP8Config.scaling must be one of {TORCHAO_SCALINGS}, got {self.scaling!r}")
        if not self.include or not all(isinstance(p, str) and p for p in self.include):
            raise ValueError(f"FP8Config.include must be non-empty name patterns, got {self.include!r}")
        if not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"FP8Config.exclude must be name patterns, got {self.exclude!r}")
        if not isinstance(self.min_features, int) or isinstance(self.min_features, bool) or self.min_features < 1:
            raise ValueError(f"FP8Config.min_features must be a positive int, got {self.min_features!r}")
        for key in ("fsdp_float8_all_gather",):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"FP8Config.{key} must be a bool, got {getattr(self, key)!r}")
        if self.emulate not in (None, True, False):
            raise ValueError(f"FP8Config.emulate must be None, True or False, got {self.emulate!r}")

    @property
    def enabled(self) -> bool:
        return self.recipe != "none"

    @property
    def float8_all_gather(self) -> bool:
        """Whether FSDP2 all-gathers converted weights in FP8 (torchao supports it for tensorwise only)."""
        return self.recipe == "torchao" and self.scaling == "tensorwise" and self.fsdp_float8_all_gather

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FP8Config:
        return strict_from_dict(cls, data)


# ---------------------------------------------------------------------------------------------- selection


def linear_decision(name: str, module: nn.Module, config: FP8Config) -> str:
    """Return "fp8" when the linear `name` goes FP8 under `config`, else why it stays high precision."""
    if type(module) is not nn.Linear:  # subclasses (already converted, quantized, LoRA...) are left alone
        return f"not a plain nn.Linear ({type(module).__name__})"
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.include):
        return "matches no include pattern"
    n_in, n_out = module.in_features, module.out_features
    if min(n_in, n_out) < config.min_features:
        return f"features ({n_in}, {n_out}) below min_features={config.min_features}"
    if n_in % FP8_DIM_MULTIPLE or n_out % FP8_DIM_MULTIPLE:
        return f"features ({n_in}, {n_out}) not multiples of {FP8_DIM_MULTIPLE} (FP8 GEMM constraint)"
    return "fp8"


def fp8_plan(model: nn.Module, config: FP8Config) -> dict[str, str]:
    """Every linear's name -> "fp8" or why it stays high precision (what a conversion would do)."""
    return {
        name: linear_decision(name, module, config)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def module_filter(config: FP8Config) -> Callable[[nn.Module, str], bool]:
    """torchao's `module_filter_fn(module, fqn)` for `config` (also usable as quantize_'s `filter_fn`)."""
    return lambda module, fqn: linear_decision(fqn, module, config) == "fp8"


def _selected(model: nn.Module, config: FP8Config) -> list[str]:
    names = [name for name, decision in fp8_plan(model, config).items() if decision == "fp8"]
    if not names:
        raise ValueError(
            f"FP8Config(recipe={config.recipe!r}) selects no linear in {type(model).__name__}: "
            f"check include={config.include}, exclude={config.exclude}, min_features={config.min_features}"
        )
    return names


def converted_modules(model: nn.Module) -> list[str]:
    """Names of the modules that run their GEMM in FP8 (torchao training or inference, or TE)."""
    names = []
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__name__ == "Float8Linear" and kind.__module__.startswith("torchao"):
            names.append(name)
        elif kind.__module__.startswith("transformer_engine") and kind.__name__ == "Linear":
            names.append(name)
        elif type(module) is nn.Linear and type(module.weight).__module__.startswith("torchao.quantization"):
            names.append(name)  # quantize_ keeps nn.Linear and swaps the weight for a Float8Tensor
    return names


# ---------------------------------------------------------------------------------------------- devices


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_emulate(config: FP8Config, model: nn.Module) -> bool:
    """config.emulate, or (None) emulate unless the model sits on an FP8-capable GPU.

    A model on the meta device (built before materialisation) is judged by the current CUDA device.
    """
    if config.emulate is not None:
        return config.emulate
    device = _model_device(model)
    if device.type == "meta":
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return not fp8_gemm_supported(device)


# ---------------------------------------------------------------------------------------------- torchao


def torchao_training_config(config: FP8Config, emulate: bool) -> Any:
    """The `torchao.float8.Float8LinearConfig` for `config` (torchao's named recipes, plus our switches)."""
    float8 = require("torchao", "FP8Config(recipe='torchao')")
    if config.scaling == "tensorwise":
        return float8.Float8LinearConfig(emulate=emulate, enable_fsdp_float8_all_gather=config.float8_all_gather)
    base = float8.Float8LinearConfig.from_recipe_name("rowwise")
    return dataclasses.replace(base, emulate=emulate)


def _torchao_training(model: nn.Module, config: FP8Config) -> nn.Module:
    float8 = require("torchao", "FP8Config(recipe='torchao')")
    ao_config = torchao_training_config(config, resolve_emulate(config, model))
    float8.convert_to_float8_training(model, module_filter_fn=module_filter(config), config=ao_config)
    return model


def _torchao_inference(model: nn.Module, config: FP8Config) -> nn.Module:
    if resolve_emulate(config, model):
        # No FP8 GEMM here: quantize_'s float8 config refuses to build (it asserts sm89+), so use the
        # training linear, which quantises weight and activation the same way and emulates the GEMM.
        emulated = dataclasses.replace(config, emulate=True, fsdp_float8_all_gather=False)
        return _torchao_training(model, emulated)
    require("torchao", "FP8Config(recipe='torchao')")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    granularity = PerTensor() if config.scaling == "tensorwise" else PerRow()
    quantize_(
        model, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=module_filter(config)
    )
    return model


# ---------------------------------------------------------------------------------------------- TE


def _transformer_engine() -> Any:
    return require("transformer_engine", "FP8Config(recipe='te')")


def _swap_for_te(model: nn.Module, config: FP8Config) -> nn.Module:
    te = _transformer_engine()
    device = _model_device(model)
    if device.type not in ("cuda", "meta"):
        raise RuntimeError(f"FP8Config(recipe='te'): Transformer Engine runs on CUDA only; the model is on {device}")
    for name in _selected(model, config):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        new = te.Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            params_dtype=old.weight.dtype,
            device=old.weight.device,
        )
        if old.weight.device.type != "meta":
            with torch.no_grad():
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        setattr(parent, child, new)
    return model


def te_recipe() -> Any:
    """Transformer Engine's current-scaling FP8 recipe (per-tensor scales from the current amax)."""
    _transformer_engine()
    from transformer_engine.common import recipe

    if not hasattr(recipe, "Float8CurrentScaling"):
        raise RuntimeError("FP8Config(recipe='te') needs Transformer Engine >= 2.2 (recipe.Float8CurrentScaling)")
    return recipe.Float8CurrentScaling()


# ---------------------------------------------------------------------------------------------- the switch


def convert_for_training(model: nn.Module, config: FP8Config) -> nn.Module:
    """Swap the selected linears for FP8 training ones, in place; returns `model`.

    Call on the built model (meta or materialised) before activation checkpointing, compile and FSDP2.
    "none": unchanged. "torchao": Float8Linear (emulated off FP8 GPUs). "te": te.Linear, to be run under
    `fp8_autocast_context(config)`. Raises ValueError when the filter selects nothing, RuntimeError when
    the library is not importable (with the import error).
    """
    if not isinstance(config, FP8Config):
        raise TypeError(f"convert_for_training needs an FP8Config, got {type(config).__name__}")
    if config.recipe == "none":
        return model
    _selected(model, config)  # fail early, with the filter in the message, when nothing matches
    if config.recipe == "torchao":
        return _torchao_training(model, config)
    return _swap_for_te(model, config)


def convert_for_inference(model: nn.Module, config: FP8Config) -> nn.Module:
    """Swap the selected linears for FP8 sampling, in place; returns `model`. Call after loading weights.

    "torchao" on an sm89+ GPU: float8 weights (quantised once, here) and dynamic float8 activations via
    `quantize_` (rowwise needs bf16 weights). Without FP8 GEMMs (CPU): emulated Float8Linear, same
    quantisation. "te": te.Linear under `fp8_autocast_context(config)`.
    """
    if not isinstance(config, FP8Config):
        raise TypeError(f"convert_for_inference needs an FP8Config, got {type(config).__name__}")
    if config.recipe == "none":
        return model
    _selected(model, config)
    if config.recipe == "torchao":
        return _torchao_inference(model, config)
    return _swap_for_te(model, config)


def fp8_autocast_context(config: FP8Config) -> contextlib.AbstractContextManager:
    """The context to run forward (and backward) in: TE's fp8 autocast for "te", a no-op otherwise."""
    if config.recipe != "te":
        return contextlib.nullcontext()
    te = _transformer_engine()
    if hasattr(te, "autocast"):  # newer TE: `autocast(enabled, recipe)`; fp8_autocast is deprecated there
        return te.autocast(enabled=True, recipe=te_recipe())
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe())


@torch.no_grad()
def post_optimizer_step(model: nn.Module, config: FP8Config) -> None:
    """After `optimizer.step()`: with FP8 all-gather under FSDP2, precompute every weight's scale at once.

    One all-reduce of all amaxes instead of one per weight during the next forward (torchtitan does the
    same). A no-op unless recipe "torchao" with tensorwise all-gather and sharded (DTensor) weights.
    """
    # Unsharded, there is nothing to precompute; checking by name spares importing torch.distributed.tensor.
    if config.float8_all_gather and any(type(p).__name__ == "DTensor" for p in model.parameters()):
        require("torchao", "FP8Config(recipe='torchao')").precompute_float8_dynamic_scale_for_fsdp(model)


# ---------------------------------------------------------------------------------------------- checkpoints


def plain_tensor(tensor: Tensor) -> Tensor:
    """torchao's FSDP weight wrapper (WeightWithDynamicFloat8CastTensor) unwrapped to its bf16/fp32 tensor."""
    inner = getattr(tensor, "_tensor", None)
    if isinstance(inner, Tensor) and type(tensor).__module__.startswith("torchao"):
        return inner.detach()  # the wrapped nn.Parameter, as a plain tensor
    return tensor


def high_precision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as plain high-precision tensors under the unconverted model's keys.

    Drops Transformer Engine's `_extra_state` (FP8 scaling metadata: run-time state, not weights) and
    unwraps torchao's weight wrapper, so the result saves with safetensors and loads into a converted or
    an unconverted model alike. Not for quantize_-converted models (their weights are FP8 already).
    """
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("._extra_state") or key == "_extra_state":
            continue
        if isinstance(value, Tensor) and type(value).__module__.startswith("torchao.quantization"):
            raise ValueError(f"{key} is a {type(value).__name__}: a quantize_-converted model holds FP8 weights")
        out[key] = plain_tensor(value) if isinstance(value, Tensor) else value
    return out


def load_high_precision_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load an ordinary (unconverted) checkpoint into a converted or unconverted model, strictly.

    Only Transformer Engine's `_extra_state` entries may be missing (they start fresh); any other missing
    or unexpected key is an error, as with `load_state_dict(strict=True)`.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"checkpoint does not match the model: missing {missing}, unexpected {result.unexpected_keys}")


def fp8_copy(model: nn.Module, config: FP8Config, *, training: bool) -> nn.Module:
    """A deep copy of `model` converted for training or inference (the original untouched)."""
    clone = copy.deepcopy(model)
    return convert_for_training(clone, config) if training else convert_for_inference(clone, config)
