"""Parallelising the MMDiT for training, torchtitan's way and in its order:
FP8 conversion (the model converter) -> activation checkpointing per block -> torch.compile per block
-> FSDP2 per block, then the root.

The FP8 swap comes first, as torchtitan's model converters do: the filter matches the linears by their
plain names (checkpoint_wrapper would rename them), compile must trace the Float8Linear forward, and
FSDP2 must see the converted weights to all-gather them in FP8.

Nothing is hand-rolled: `checkpoint_wrapper` recomputes a block in backward, `torch.compile` compiles
each block (blocks of one class share code, so the graph is compiled once per block type and reused),
`fully_shard` shards every block and the root over the data-parallel mesh. World size 1 works too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from selfe.components.fp8 import FP8Config, convert_for_training
from selfe.train.config import ParallelConfig


def param_dtype_for(config: ParallelConfig, device: torch.device) -> torch.dtype:
    """bf16 parameters for compute on CUDA under precision 'auto'/'bf16'; fp32 on CPU or when asked."""
    if config.precision == "fp32" or (config.precision == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def blocks_of(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every transformer block, double-stream first."""
    return [(blocks, i) for blocks in (model.double_blocks, model.single_blocks) for i in range(len(blocks))]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every block so that its activations are recomputed in backward (full, per block)."""
    for blocks, i in blocks_of(model):
        blocks[i] = checkpoint_wrapper(blocks[i], preserve_rng_state=False)


# Compiled graphs a block's forward may keep: {grad, no grad} x {B, B/2 (self-eval, aux)} x the resolutions
# of the schedule, for both block types at once under activation checkpointing (one wrapper code object).
# Past dynamo's default of 8 a block stops compiling: with fullgraph (our default) dynamo raises, without
# it the block silently runs eagerly from then on.
COMPILE_RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module, fullgraph: bool = True, backend: str = "inductor") -> None:
    """torch.compile each block in place (Module.compile keeps names and state-dict keys unchanged), one
    static graph per shape (dynamic=False; the trainer raises the limit to selfe.train.compile_shapes' bound)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    for blocks, i in blocks_of(model):
        blocks[i].compile(fullgraph=fullgraph, backend=backend, dynamic=False)


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: bool = True
) -> None:
    """FSDP2 on every block, then the root (embedders, final layer). Gradients are reduced in fp32.

    Inputs are not cast (cast_forward_inputs=False): the model casts x, txt and pooled to its weights' dtype
    itself, and keeps t, s and the RoPE tables in fp32, as it does when sampling. FSDP's cast would round t
    and s to bf16 before the time embeddings (t - s to steps of ~0.004 near t = 1) in training alone."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for blocks, i in blocks_of(model):
        fully_shard(blocks[i], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root's parameters are used again at once by the next forward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize(
    model: nn.Module,
    config: ParallelConfig,
    mesh: DeviceMesh,
    *,
    trainable: bool = True,
    fp8: FP8Config | None = None,
) -> nn.Module:
    """Apply the passes in order; `trainable=False` (the EMA copy) skips activation checkpointing.

    `fp8` converts the selected linears for FP8 training first (trainable networks only: the EMA copy
    is averaged and evaluated in high precision, so passing it there is an error).
    """
    device = torch.device(mesh.device_type)
    if fp8 is not None and fp8.enabled:
        if not trainable:
            raise ValueError(
                "parallelize: fp8 conversion is for the trainable network; the EMA copy stays high precision"
            )
        convert_for_training(model, fp8)
    if trainable and config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.compile:
        apply_compile(model, config.compile_fullgraph, config.compile_backend)
    reshard = config.reshard_after_forward if config.reshard_after_forward is not None else mesh.size() > 1
    apply_fsdp(model, mesh, param_dtype_for(config, device), reshard)
    return model


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter so `parameters()` are the sharded DTensors again (an FSDP module
    kept gathered after forward exposes plain tensors; the EMA lerp needs the shards on both sides)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
