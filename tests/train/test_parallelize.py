"""The parallelize passes (one gloo process): what the blocks see under FSDP2 with bf16 parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from selfe.network.config import mmdit_preset
from selfe.network.model import MMDiT
from selfe.train.config import ParallelConfig
from selfe.train.parallelize import parallelize


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def input_dtypes(model: MMDiT, x, t, s, cond) -> list[tuple[str, list[str]]]:
    """(module, dtypes of its floating-point tensor inputs) for the time embedders and every block."""
    seen = []

    def record(name):
        def hook(module, args, kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if torch.is_tensor(a) and a.is_floating_point()]
            seen.append((name, [str(a.dtype) for a in tensors]))

        return hook

    handles = [model.time_in.register_forward_pre_hook(record("time_in"), with_kwargs=True)]
    for name, block in [*model.double_blocks.named_children(), *model.single_blocks.named_children()]:
        handles.append(block.register_forward_pre_hook(record(f"block {name}"), with_kwargs=True))
    handles.append(model.register_forward_pre_hook(record("root"), with_kwargs=True))
    try:
        model(x, t, s, cond)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_bf16_fsdp_blocks_see_what_a_bf16_model_sees(one_process_group) -> None:
    torch.manual_seed(0)
    model = MMDiT(mmdit_preset("tiny"))
    plain = copy.deepcopy(model).to(torch.bfloat16)  # how the pipeline samples in bf16
    sharded = parallelize(model, ParallelConfig(precision="bf16"), one_process_group)
    x, t, s = torch.randn(2, 16, 8, 8), torch.tensor([0.997, 0.5]), torch.tensor([0.993, 0.25])
    config = sharded.config
    cond = {"txt": torch.randn(2, 8, config.txt_dim), "txt_mask": None, "pooled": torch.randn(2, config.vec_dim)}
    # The time embedders' inputs are fp32 sinusoids of fp32 t and s: FSDP's input cast would round
    # t = 0.997 and s = 0.993 to bf16, and the 0.004 gap between them with it.
    got, want = input_dtypes(sharded, x, t, s, cond), input_dtypes(plain, x, t, s, cond)
    assert got == want
    assert ("root", ["torch.float32"] * 3) in got  # x, t and s reach the model as given


def test_compiled_blocks_may_keep_a_graph_per_pass_and_shape() -> None:
    from selfe.train.parallelize import COMPILE_RECOMPILE_LIMIT, apply_compile

    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default, restored after
        apply_compile(MMDiT(mmdit_preset("tiny")), backend="aot_eager")
        assert torch._dynamo.config.recompile_limit == COMPILE_RECOMPILE_LIMIT
