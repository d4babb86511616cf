"""The compiled blocks see static shapes from the documented set (selfe.train.compile_shapes): a run that
visits every text bucket, with and without the auxiliary term, compiles exactly the bound's graphs per block,
none of them dynamic, and after that first visit of each shape it never compiles again."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from selfe.network.layers import DoubleStreamBlock, SingleStreamBlock
from selfe.train import trainer as trainer_module
from selfe.train.compile_shapes import bucket_lengths, compile_shapes
from selfe.train.config import preset
from selfe.train.sources import CONDITION_KEYS
from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import tiny_config

BACKEND = "selfe_test_static_count"
REAL_TOKENS = (1, 3, 6, 12)  # text buckets 2, 4, 8, 16 of data.text_bucket=2 at data.text_length=16
graph_inputs: list[list] = []  # the example inputs of every graph compiled: (shape, dtype)


def _counting_backend(gm, example_inputs):
    graph_inputs.append([(tuple(x.shape), x.dtype) for x in example_inputs if isinstance(x, torch.Tensor)])
    return gm.forward  # eager: dynamo's guards and recompiles without code generation


if BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_backend, name=BACKEND)


class _EveryTextBucket:
    """The procedural source with each step's real text at 1, 3, 6, 12 tokens in turn (all four
    conditions), so that data.text_bucket=2 cuts the steps to 2, 4, 8 and 16 tokens."""

    def __init__(self, inner):
        self.inner, self.steps = inner, 0
        self.num_samples = inner.num_samples

    def next_step(self, want_fake: bool):
        real = REAL_TOKENS[self.steps % len(REAL_TOKENS)]
        self.steps += 1
        batches = self.inner.next_step(want_fake)
        for batch in batches:
            for key in CONDITION_KEYS:
                if batch[key] is not None:
                    mask = torch.zeros_like(batch[key]["txt_mask"])
                    mask[:, :real] = True
                    batch[key] = {**batch[key], "txt_mask": mask}
        return batches

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_the_2b_recipe_buckets_its_text_within_a_documented_bound():
    config = preset("2b")
    shapes = compile_shapes(config)
    assert config.data.text_bucket == 64 and bucket_lengths(64, 512) == (64, 128, 256, 512)
    assert shapes.text_lengths == (64, 128, 256, 512) and shapes.text_count == 5  # and a cache's own length
    assert shapes.live_passes == 3 and shapes.activation_checkpointing == "auto"  # main, self-eval, fake (550k on)
    assert len(shapes.image_tokens) <= 22  # 11 aspect buckets at 256^2 and at 512^2, distinct token counts
    assert shapes.graphs_per_code == 6 * len(shapes.image_tokens) * 5


@pytest.mark.slow
def test_every_text_bucket_compiles_once_and_statically(tmp_path, monkeypatch):
    steps = 12
    config = tiny_config(
        tmp_path, steps, "data.text_length=16", "data.text_bucket=2", "objective.aux_start=4",
        "parallel.compile=true", f"parallel.compile_backend={BACKEND}", "data.prefetch_steps=0",
    )  # fmt: skip
    shapes = compile_shapes(config)
    assert shapes.text_lengths == (2, 4, 8, 16) and len(shapes.image_tokens) == 1
    assert shapes.graphs_per_code == (3 + 1) * 1 * 4  # 3 live passes and the EMA's, per text length
    real_build = trainer_module.build_source
    monkeypatch.setattr(trainer_module, "build_source", lambda *a, **k: _EveryTextBucket(real_build(*a, **k)))
    torch._dynamo.reset()
    graph_inputs.clear()
    dynamo = torch._dynamo.config
    # dynamo's own patch restores the limits the trainer raises (pytest's monkeypatch would delete them)
    with dynamo.patch(recompile_limit=dynamo.recompile_limit, error_on_recompile=False,
                      accumulated_recompile_limit=dynamo.accumulated_recompile_limit):  # fmt: skip
        trainer = Trainer(config)
        try:
            for _ in range(8):  # steps 0-3 without the auxiliary term, 4-7 with it: every bucket of each
                trainer.train_step()
            first_visit = {
                block: len(_debug_get_cache_entry_list(block.forward.__code__))
                for block in (DoubleStreamBlock, SingleStreamBlock)
            }
            dynamo.error_on_recompile = True  # the second visit of every shape compiles nothing
            for _ in range(4):  # steps 8-11: every bucket again, with the auxiliary term
                trainer.train_step()
            records = trainer.log_metrics()
        finally:
            trainer.close()
            torch._dynamo.reset()
    assert first_visit == {DoubleStreamBlock: shapes.graphs_per_code, SingleStreamBlock: shapes.graphs_per_code}
    assert len(graph_inputs) == 2 * shapes.graphs_per_code
    assert all(isinstance(n, int) for inputs in graph_inputs for shape, _ in inputs for n in shape)  # no SymInt
    # the text enters a double block as (B, text tokens, D) and a single block inside (B, image + text tokens, D);
    # 32^2 latents at patch 2: 4 image tokens
    activations = [shape for inputs in graph_inputs for shape, dtype in inputs if dtype.is_floating_point]
    lengths = {shape[1] for shape in activations if len(shape) == 3}
    assert {2, 4, 8, 16} <= lengths and {n + shapes.image_tokens[0] for n in (2, 4, 8, 16)} <= lengths
    assert len(records) == steps and not any(r["skipped"] for r in records)
