"""MMDiTConfig: presets, validation, dict round trips, the analytical parameter count."""

from __future__ import annotations

import json

import pytest
import torch

from selfe.network.config import PRESETS, MMDiTConfig, mmdit_preset
from selfe.network.model import MMDiT


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name: str) -> None:
    config = mmdit_preset(name)
    again = MMDiTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert isinstance(again.axes_dim, tuple)
    assert sum(config.axes_dim) == config.head_dim


def test_paper_sizes() -> None:
    two_b, half_b = mmdit_preset("2b"), mmdit_preset("0.5b")
    assert (two_b.hidden_size, two_b.num_heads, two_b.head_dim, two_b.axes_dim) == (
        2048,
        16,
        128,
        (16, 56, 56),
    )
    assert (half_b.hidden_size, half_b.num_heads, half_b.head_dim, half_b.axes_dim) == (
        1024,
        16,
        64,
        (8, 28, 28),
    )
    for config in (two_b, half_b):
        assert (config.depth_double, config.depth_single) == (8, 16)
        assert (config.txt_dim, config.vec_dim, config.in_channels, config.patch_dim) == (4096, 768, 16, 64)


def test_unknown_key_is_an_error() -> None:
    data = mmdit_preset("tiny").to_dict()
    data["hidden_sise"] = 64
    with pytest.raises(ValueError, match="unknown MMDiTConfig keys: \\['hidden_sise'\\]"):
        MMDiTConfig.from_dict(data)


def test_preset_lookup_and_overrides() -> None:
    config = mmdit_preset("tiny", depth_single=3, attention_backend="math")
    assert (config.depth_single, config.attention_backend, config.hidden_size) == (3, "math", 64)
    with pytest.raises(ValueError, match="unknown MMDiT preset '3b'"):
        mmdit_preset("3b")
    with pytest.raises(ValueError, match="unknown MMDiTConfig keys in overrides: \\['width'\\]"):
        mmdit_preset("tiny", width=3)
    with pytest.raises(ValueError, match="axes_dim"):
        mmdit_preset("tiny", axes_dim=(4, 4, 4))  # re-validated


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"hidden_size": 66}, "divisible by num_heads"),
        ({"axes_dim": (4, 6, 4)}, "sums to 14, but the head dim is 16"),
        ({"axes_dim": (3, 7, 6)}, "positive even ints"),
        ({"axes_dim": (16,)}, "needs 3 axes"),
        ({"num_heads": 0}, "num_heads must be a positive int"),
        ({"hidden_size": 64.0}, "hidden_size must be a positive int"),
        ({"depth_double": -1}, "depth_double must be an int >= 0"),
        ({"depth_double": 0, "depth_single": 0}, "at least one block"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0"),
        ({"mlp_ratio": 4.01}, "is not an integer"),
        ({"time_embed_dim": 31}, "time_embed_dim must be even"),
        ({"rope_theta": 0}, "rope_theta must be > 0"),
        ({"norm_eps": -1.0}, "norm_eps must be > 0"),
        ({"mlp_activation": "relu"}, "mlp_activation must be one of"),
        ({"kernel_backend": "cudnn"}, "kernel_backend must be one of"),
        ({"attention_backend": "flash3"}, "attention_backend must be one of"),
    ],
)
def test_validation_names_the_problem(overrides: dict, match: str) -> None:
    data = mmdit_preset("tiny").to_dict()
    data.update(overrides)
    with pytest.raises(ValueError, match=match):
        MMDiTConfig.from_dict(data)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"qkv_bias": False},
        {"mlp_ratio": 2.5, "depth_double": 2, "depth_single": 0},
        {"depth_double": 0, "depth_single": 2, "patch_size": 1, "in_channels": 4},
    ],
)
def test_num_parameters_matches_a_built_model(overrides: dict) -> None:
    config = mmdit_preset("tiny", **overrides)
    with torch.device("meta"):
        model = MMDiT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
