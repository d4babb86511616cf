"""The dual-time MMDiT's hyper-parameters: one validated dataclass, presets as functions.

A model is built from an `MMDiTConfig` and nothing else; the config round-trips through
`to_dict()` / `from_dict()` (the `config.json` saved beside every checkpoint and export).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selfe.kernels.dispatch import BACKENDS as KERNEL_BACKENDS
from selfe.network.attention import known_attention_backends

MLP_ACTIVATIONS = ("gelu_tanh", "gelu", "silu")


@dataclass
class MMDiTConfig:
    """A FLUX-style MMDiT whose global vector carries two times (docs/method.md §2).

    Width `hidden_size` = `num_heads * head_dim`; the 2-D RoPE splits each head into `axes_dim`
    (one chunk per id axis: (unused, row, col) for FLUX-style ids), so `sum(axes_dim) == head_dim`.
    """

    hidden_size: int
    num_heads: int
    depth_double: int
    depth_single: int
    axes_dim: tuple[int, ...]
    in_channels: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    qkv_bias: bool = True  # double blocks' qkv; single blocks' fused linear1 always has a bias, as in FLUX
    txt_dim: int = 4096  # T5-XXL token states
    vec_dim: int = 768  # pooled CLIP ViT-L/14
    time_embed_dim: int = 256  # sinusoid width fed to MLP_t and MLP_s
    time_factor: float = 1000.0  # t in [0, 1] is scaled by this before the sinusoid (FLUX)
    time_max_period: float = 10000.0
    mlp_activation: str = "gelu_tanh"  # FLUX's choice; the paper is silent
    attention_backend: str = "auto"  # sdpa_cudnn on CUDA (measured fastest), sdpa elsewhere
    kernel_backend: str = "auto"
    norm_eps: float = 1e-6  # LayerNorm (adaLN) and QK RMSNorm
    # [ours] MLP_s's last layer starts at zero so that at init the network ignores s (docs/method.md §2).
    zero_init_gap_embedder: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.axes_dim, (str, bytes)) or not isinstance(self.axes_dim, (list, tuple)):
            raise ValueError(
                f"MMDiTConfig.axes_dim must be a list or tuple of 3 positive even ints, got {self.axes_dim!r}"
            )
        self.axes_dim = tuple(self.axes_dim)  # lists from JSON become tuples
        positive_ints = (
            "hidden_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "txt_dim",
            "vec_dim",
            "time_embed_dim",
        )
        for key in positive_ints:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MMDiTConfig.{key} must be a positive int, got {value!r}")
        for key in ("depth_double", "depth_single"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MMDiTConfig.{key} must be an int >= 0, got {value!r}")
        if self.depth_double + self.depth_single == 0:
            raise ValueError("MMDiTConfig needs at least one block: depth_double + depth_single == 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"MMDiTConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.axes_dim or any(
            isinstance(d, bool) or not isinstance(d, int) or d <= 0 or d % 2 for d in self.axes_dim
        ):
            raise ValueError(f"MMDiTConfig.axes_dim must be positive even ints (RoPE pairs), got {self.axes_dim}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"MMDiTConfig.axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, "
                f"but the head dim is {self.head_dim} (hidden_size / num_heads)"
            )
        if len(self.axes_dim) != 3:
            raise ValueError(f"MMDiTConfig.axes_dim needs 3 axes (0, row, col) like FLUX ids, got {self.axes_dim}")
        if self.time_embed_dim % 2:
            raise ValueError(f"MMDiTConfig.time_embed_dim must be even (cos/sin halves), got {self.time_embed_dim}")
        for key in ("mlp_ratio", "rope_theta", "time_factor", "time_max_period", "norm_eps"):
            value = getattr(self, key)
            # NaN fails `> 0`, inf fails isfinite: either would turn every activation into NaN / inf.
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"MMDiTConfig.{key} must be > 0 and finite, got {value!r}")
        for key in ("qkv_bias", "zero_init_gap_embedder"):
            if not isinstance(getattr(self, key), bool):  # JSON "no" / 1 must not pass as a truthy value
                raise ValueError(f"MMDiTConfig.{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"MMDiTConfig.name must be a string, got {self.name!r}")
        if self.mlp_hidden_dim * 1.0 != self.hidden_size * self.mlp_ratio:
            raise ValueError(
                f"MMDiTConfig: hidden_size * mlp_ratio = {self.hidden_size * self.mlp_ratio} is not an integer"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"MMDiTConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}"
            )
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"MMDiTConfig.kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}"
            )
        if self.attention_backend not in known_attention_backends():
            raise ValueError(
                f"MMDiTConfig.attention_backend must be one of {known_attention_backends()}, "
                f"got {self.attention_backend!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Values per image token: in_channels * patch_size^2 (64 for the FLUX autoencoder)."""
        return self.in_channels * self.patch_size**2

    def num_parameters(self) -> int:
        """Exact parameter count in closed form (no model is built); equals `MMDiT(config)`'s count."""
        d, f, p, dh = self.hidden_size, self.mlp_hidden_dim, self.patch_dim, self.head_dim
        qkv_bias = 3 * d if self.qkv_bias else 0

        def linear(n_in: int, n_out: int, bias: bool = True) -> int:
            return n_in * n_out + (n_out if bias else 0)

        def mlp_embedder(n_in: int) -> int:
            return linear(n_in, d) + linear(d, d)

        embed = (
            linear(p, d)  # img_in
            + linear(self.txt_dim, d)  # txt_in
            + 2 * mlp_embedder(self.time_embed_dim)  # MLP_t, MLP_s
            + mlp_embedder(self.vec_dim)  # MLP_clip
        )
        stream = (
            linear(d, 6 * d)  # modulation: shift/scale/gate for attention and MLP
            + 3 * d * d
            + qkv_bias  # qkv
            + 2 * dh  # QK RMSNorm weights
            + linear(d, d)  # attention output projection
            + linear(d, f)
            + linear(f, d)  # MLP
        )
        single = (
            linear(d, 3 * d)  # modulation
            + linear(d, 3 * d + f)  # linear1: qkv and MLP-in side by side
            + linear(d + f, d)  # linear2: attention out and MLP-out side by side
            + 2 * dh
        )
        final = linear(d, 2 * d) + linear(d, p)
        return embed + self.depth_double * 2 * stream + self.depth_single * single + final

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["axes_dim"] = list(self.axes_dim)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MMDiTConfig:
        """Inverse of `to_dict`; unknown keys are errors (a typo must not silently fall back to a default)."""
        return strict_from_dict(cls, data)


def strict_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build config dataclass `cls` from a dict; unknown keys are errors (a typo must not fall back to a
    default), and so are missing required keys and a value that is not a dict, each named."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be built from a dict (a JSON object), got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known: {sorted(known)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{cls.__name__} lacks the required keys {missing}")
    return cls(**data)


def tiny() -> MMDiTConfig:
    """For tests: width 64, 4 heads of 16, 1 double + 1 single block, small text/pooled dims."""
    return MMDiTConfig(
        name="tiny",
        hidden_size=64,
        num_heads=4,
        depth_double=1,
        depth_single=1,
        axes_dim=(4, 6, 6),
        txt_dim=32,
        vec_dim=16,
        time_embed_dim=32,
    )


def mmdit_0_5b() -> MMDiTConfig:
    """The paper's ablation model: width 1024, 16 heads of 64, 8 double + 16 single, RoPE axes (8, 28, 28)."""
    return MMDiTConfig(
        name="0.5b", hidden_size=1024, num_heads=16, depth_double=8, depth_single=16, axes_dim=(8, 28, 28)
    )


def mmdit_2b() -> MMDiTConfig:
    """The paper's main model: width 2048, 16 heads of 128, 8 double + 16 single, RoPE axes (16, 56, 56)."""
    return MMDiTConfig(
        name="2b", hidden_size=2048, num_heads=16, depth_double=8, depth_single=16, axes_dim=(16, 56, 56)
    )


PRESETS: dict[str, Callable[[], MMDiTConfig]] = {"tiny": tiny, "0.5b": mmdit_0_5b, "2b": mmdit_2b}


def mmdit_preset(name: str, **overrides: Any) -> MMDiTConfig:
    """The preset `name` ("tiny", "0.5b", "2b"), with optional field overrides (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MMDiT preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]()
    if overrides:
        data = config.to_dict()
        unknown = sorted(set(overrides) - set(data))
        if unknown:
            raise ValueError(f"unknown MMDiTConfig keys in overrides: {unknown}")
        data.update(overrides)
        config = MMDiTConfig.from_dict(data)
    return config
