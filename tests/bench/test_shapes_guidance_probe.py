"""bench/shapes_guidance_probe.py reads the implicit guidance of a jump: checked on a network whose jump is
CFG at a known omega by construction, and on one whose jump ignores s."""

from __future__ import annotations

import pytest
import torch

from bench.shapes_guidance_probe import probe
from selfe.sampling.fast_path import FastPathConfig
from selfe.sampling.pipeline import SelfEPipeline
from selfe.shapes import shipped_model_dir


class GuidedJump(torch.nn.Module):
    """V(x, t, s, c) = V_c + a (V_c - V_u) wherever s < t, of the wrapped network's own V_c and V_u."""

    def __init__(self, net, null, a: float):
        super().__init__()
        self.net, self.null, self.a, self.config = net, null, a, net.config
        self.img_in = net.img_in  # the pipeline reads its device and dtype here

    def forward(self, x, t, s, cond):
        v_c = self.net(x, t, t, cond)
        if torch.equal(s, t):
            return v_c
        return v_c + self.a * (v_c - self.net(x, t, t, self.null))


@pytest.fixture(scope="module")
def pipe():
    return SelfEPipeline.from_pretrained(shipped_model_dir(), device="cpu", fast_path=FastPathConfig(compile=False))


@pytest.mark.parametrize("a", [0.0, 1.5])
def test_a_jump_that_is_cfg_reads_as_its_omega(pipe, a):
    captions = ["a red circle", "a blue square to the left of a green triangle", "two triangles"]
    _, null = pipe.encode_prompts(captions, guided=True)
    original = pipe.model
    try:
        pipe.model = GuidedJump(original, null, a)
        result = probe(pipe, captions, [1, 2, 50], seed=3)
    finally:
        pipe.model = original
    assert result["cfg_gap"] > 0.01  # conditional and unconditional differ: the direction is defined
    for n, row in result["steps"].items():
        assert row["implicit_omega"] == pytest.approx(1 + a, abs=2e-3), n
        if a:
            assert row["r2"] == pytest.approx(1.0, abs=1e-3), n
        else:
            assert row["jump_change"] == 0.0
