"""Model growth (`checkpoint.init_grow`): a deeper model starts from a trained one's weights and function."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from selfe.components.weights import StateDictMismatchError
from selfe.network.config import mmdit_preset
from selfe.network.model import MMDiT
from selfe.train.config import apply_overrides, preset
from selfe.train.initial_weights import load_initial_weights

SOURCE = mmdit_preset("tiny", depth_double=2, depth_single=1)


def _trained_like(config) -> MMDiT:
    """A source whose every tensor is non-zero, gates included (a fresh init's are 0 and would hide a bug)."""
    net = MMDiT(config)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(0.2 * torch.randn_like(param))
    return net


def _inputs(config, batch: int = 3):
    text_length = 7
    mask = torch.ones(batch, text_length, dtype=torch.bool)
    mask[0, 4:] = False  # ragged text: padding keys are masked
    cond = {
        "txt": torch.randn(batch, text_length, config.txt_dim),
        "pooled": torch.randn(batch, config.vec_dim),
        "txt_mask": mask,
    }
    t = torch.rand(batch) * 0.9 + 0.05
    return torch.randn(batch, config.in_channels, 6, 10), t, t * torch.rand(batch), cond


def _saved(net: MMDiT, path) -> str:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize("extra_double, extra_single", [(0, 3), (1, 0), (2, 2)])
def test_the_grown_model_computes_the_source_function_and_keeps_the_new_blocks_init(
    tmp_path, extra_double, extra_single
):
    torch.manual_seed(extra_double * 10 + extra_single)
    source = _trained_like(SOURCE)
    grown_config = dataclasses.replace(
        SOURCE, depth_double=SOURCE.depth_double + extra_double, depth_single=SOURCE.depth_single + extra_single
    )
    grown = MMDiT(grown_config)
    fresh = {k: v.clone() for k, v in grown.state_dict().items()}
    load_initial_weights(grown, _saved(source, tmp_path / "source.safetensors"), grown_config, grow=True)

    x, t, s, cond = _inputs(SOURCE)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, s, cond), source(x, t, s, cond), rtol=1e-6, atol=1e-6)
    loaded = source.state_dict()
    for name, value in grown.state_dict().items():
        expected = loaded[name] if name in loaded else fresh[name]  # new blocks: exactly the fresh init
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    new_names = set(fresh) - set(loaded)
    assert len(new_names) > 0 and all(n.startswith(("double_blocks.", "single_blocks.")) for n in new_names)


def test_the_new_blocks_learn(tmp_path):
    torch.manual_seed(0)
    source = _trained_like(SOURCE)
    grown_config = dataclasses.replace(SOURCE, depth_single=3)
    grown = MMDiT(grown_config)
    load_initial_weights(grown, _saved(source, tmp_path / "source.safetensors"), grown_config, grow=True)
    x, t, s, cond = _inputs(SOURCE)
    grown(x, t, s, cond).square().mean().backward()
    for index in (1, 2):  # the identity blocks: their gates get a gradient, so they leave the identity
        grad = grown.single_blocks[index].modulation.lin.weight.grad
        assert grad is not None and grad.abs().max() > 0


def test_growth_refuses_what_is_not_growth(tmp_path):
    torch.manual_seed(0)
    source_file = _saved(_trained_like(SOURCE), tmp_path / "source.safetensors")
    shallower = dataclasses.replace(SOURCE, depth_double=1)
    with pytest.raises(StateDictMismatchError, match="unexpected.*double_blocks.1"):
        load_initial_weights(MMDiT(shallower), source_file, shallower, grow=True)
    wider = dataclasses.replace(SOURCE, hidden_size=128, num_heads=8, depth_single=2)
    with pytest.raises(StateDictMismatchError, match="shape mismatched"):
        load_initial_weights(MMDiT(wider), source_file, wider, grow=True)
    # A tensor missing outside the new blocks is still an error, not left at its init.
    state = {k: v.contiguous() for k, v in _trained_like(SOURCE).state_dict().items()}
    del state["final_layer.linear.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    deeper = dataclasses.replace(SOURCE, depth_single=2)
    with pytest.raises(StateDictMismatchError, match="missing.*final_layer.linear.weight"):
        load_initial_weights(MMDiT(deeper), tmp_path / "partial.safetensors", deeper, grow=True)
    # Without init_grow a deeper model is refused as before.
    with pytest.raises(StateDictMismatchError, match="missing.*single_blocks.1"):
        load_initial_weights(MMDiT(deeper), source_file, deeper)


def test_init_grow_needs_init_from():
    with pytest.raises(ValueError, match="init_grow.*init_from"):
        apply_overrides(preset("smoke"), ["checkpoint.init_grow=true"])
