"""Pipeline directories with random weights for tests: the layout `SelfEPipeline.from_pretrained` documents."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfe.network.config import MMDiTConfig
from selfe.network.model import MMDiT
from selfe.sampling.fast_path import _GraphedStep
from tests.helpers_text import make_tiny_clip_snapshot, make_tiny_t5_snapshot


def random_mmdit(config: MMDiTConfig, seed: int = 0) -> MMDiT:
    """An MMDiT with every weight random: init zeros the output layers, and images should depend on everything."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MMDiT(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
    return model


def write_pipeline_dir(root: Path, model: MMDiT, meta: dict) -> Path:
    """root/model.safetensors, root/config.json (`meta`) and tiny T5 / CLIP snapshots sized to the model."""
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(meta))
    make_tiny_t5_snapshot(root / "text_encoder", d_model=model.config.txt_dim)
    make_tiny_clip_snapshot(root / "text_encoder_2", hidden_size=model.config.vec_dim)
    return root


class ReplayOnCPU(_GraphedStep):
    """The CUDA-graph bookkeeping without CUDA (swap in as FastSampler.graph_class): capture runs the step
    once on the static inputs, replay runs it again on whatever they hold now and writes the static output,
    as a graph replay would."""

    @staticmethod
    def new_pool():
        return object()

    def _capture(self, pool, warmup_iters):
        return self.step(**self.static)

    def replay(self):
        self.out.copy_(self.step(**self.static))
