"""Parallelising the MMDiT for training, torchtitan's way and in its order:
FP8 conversion (the model converter) -> activation checkpointing per block -> torch.compile per block
-> FSDP2 per block, then the root.

The FP8 swap comes first, as torchtitan's model converters do: the filter matches the linears by their
plain names (checkpoint_wrapper would rename them), compile must trace the Float8Linear forward, and
FSDP2 must see the converted weights to all-gather them in FP8.

Nothing is hand-rolled: `checkpoint_wrapper` recomputes a block in backward (all of it, or under the
selective policy only its elementwise ops: torch's selective checkpoint contexts), `torch.compile` compiles
each block (blocks of one class share code, so the graph is compiled once per block type and reused),
`fully_shard` shards every block and the root over the data-parallel mesh, with explicit prefetch of the
next block's all-gather. World size 1 works too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from selfe.components.fp8 import FP8Config, convert_for_training, fp8_plan
from selfe.train.config import AC_POLICIES, ParallelConfig


def param_dtype_for(config: ParallelConfig, device: torch.device) -> torch.dtype:
    """bf16 parameters for compute on CUDA under precision 'auto'/'bf16'; fp32 on CPU or when asked."""
    if config.precision == "fp32" or (config.precision == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def blocks_of(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every transformer block, double-stream first."""
    return [(blocks, i) for blocks in (model.double_blocks, model.single_blocks) for i in range(len(blocks))]


# What the selective policy keeps: the outputs of the GEMMs (FP8's scaled GEMM included) and of attention,
# the ops whose recomputation would cost most; everything between them (norms, modulation, activations, RoPE,
# residuals) is recomputed in backward from those.
_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_mm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._flash_attention_forward.default,
    _aten._efficient_attention_forward.default,
}


def saves_output(op) -> bool:
    """Whether the selective policy keeps `op`'s output: a listed GEMM or attention op, or one of our own
    attention kernels (selfe::rope_flash_attention, any selfe op named for attention)."""
    if op in SAVED_OPS:
        return True
    name = getattr(op, "__name__", "") or str(op)
    return str(getattr(op, "namespace", "")) == "selfe" and "attention" in name and "backward" not in name


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if saves_output(op) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """The (forward, recompute) context pair torch.utils.checkpoint takes as `context_fn`."""
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(model: nn.Module, policy: str = "full") -> None:
    """Wrap every block so that backward recomputes its activations: `full` (the whole block from its inputs)
    or `selective` (only what the GEMMs and attention do not produce); `none` leaves the blocks as they are."""
    if policy not in AC_POLICIES:
        raise ValueError(f"activation checkpointing policy must be one of {AC_POLICIES}, got {policy!r}")
    if policy == "none":
        return
    extra = {"context_fn": selective_contexts} if policy == "selective" else {}
    for blocks, i in blocks_of(model):
        blocks[i] = checkpoint_wrapper(blocks[i], preserve_rng_state=False, **extra)


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
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reshard_after_forward: bool = True,
    prefetch_blocks: int = 1,
    reshard_root: bool = False,
) -> None:
    """FSDP2 on every block, then the root (embedders, final layer). Parameters are all-gathered in
    `param_dtype` (bf16 on CUDA; FP8 for torchao's converted linears with FP8 all-gather), gradients
    reduce-scattered in fp32.

    Inputs are not cast (cast_forward_inputs=False): the model casts x, txt and pooled to its weights' dtype
    itself, and keeps t, s and the RoPE tables in fp32, as it does when sampling. FSDP's cast would round t
    and s to bf16 before the time embeddings (t - s to steps of ~0.004 near t = 1) in training alone.

    prefetch_blocks: each block's forward issues the all-gathers of the next ones (backward: of the ones
    before it), so communication runs under the current block's compute. reshard_root: free the root's
    gathered parameters after forward too (the EMA copy, which runs one forward a step)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    order = [blocks[i] for blocks, i in blocks_of(model)]  # the forward's order: double, then single blocks
    for block in order:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The live root's parameters are used again at once by the next forward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_root)
    if prefetch_blocks > 0:
        for i, block in enumerate(order):
            ahead = order[i + 1 : i + 1 + prefetch_blocks]
            behind = order[max(0, i - prefetch_blocks) : i][::-1]
            if ahead:
                block.set_modules_to_forward_prefetch(ahead)
            if behind:
                block.set_modules_to_backward_prefetch(behind)


def parallelize(
    model: nn.Module,
    config: ParallelConfig,
    mesh: DeviceMesh,
    *,
    trainable: bool = True,
    fp8: FP8Config | None = None,
) -> nn.Module:
    """Apply the passes in order; `trainable=False` (the EMA copy) skips activation checkpointing and
    frees every gathered parameter after its forward: it runs one no-grad forward a step, so each of its
    parameters is all-gathered once a step and none stays gathered through the live network's backward.

    `fp8` converts the selected linears for FP8 training first (trainable networks only: the EMA copy
    is averaged and evaluated in high precision, so passing it there is an error). The activation
    checkpointing policy must be resolved first (`auto`: selfe.train.memory_plan).
    """
    device = torch.device(mesh.device_type)
    if fp8 is not None and fp8.enabled:
        if not trainable:
            raise ValueError(
                "parallelize: fp8 conversion is for the trainable network; the EMA copy stays high precision"
            )
        convert_for_training(model, fp8)
    if config.activation_checkpointing == "auto":
        raise ValueError(
            "parallelize: activation_checkpointing='auto' is resolved by selfe.train.memory_plan first "
            "(plan_activation_checkpointing), then passed as the policy it chose"
        )
    if trainable:
        apply_activation_checkpointing(model, config.activation_checkpointing)
    if config.compile:
        apply_compile(model, config.compile_fullgraph, config.compile_backend)
    reshard = config.reshard_after_forward if config.reshard_after_forward is not None else mesh.size() > 1
    param_dtype = param_dtype_for(config, device)
    if trainable:
        apply_fsdp(model, mesh, param_dtype, reshard, config.prefetch_blocks)
    else:
        apply_fsdp(model, mesh, param_dtype, True, config.prefetch_blocks, reshard_root=True)
    return model


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter so `parameters()` are the sharded DTensors again (an FSDP module
    kept gathered after forward exposes plain tensors; the EMA lerp needs the shards on both sides)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@dataclass(frozen=True)
class CommVolume:
    """Bytes one rank receives per optimizer step through FSDP2's collectives (ring algorithms: a rank
    receives (W - 1) / W of each gathered or reduced tensor), from the parameter sizes alone."""

    all_gather_bytes: int
    reduce_scatter_bytes: int
    gathers_per_step: int  # all-gathers of every block's parameters per step (live forwards, backward, EMA)

    @property
    def total_bytes(self) -> int:
        return self.all_gather_bytes + self.reduce_scatter_bytes

    def describe(self) -> str:
        return (
            f"communication per step and rank: all-gather {self.all_gather_bytes / 2**30:.2f} GiB "
            f"({self.gathers_per_step} gathers of the blocks), reduce-scatter {self.reduce_scatter_bytes / 2**30:.2f} "
            f"GiB (fp32 gradients)"
        )


def comm_volume(model: nn.Module, config, world_size: int) -> CommVolume:
    """The per-step communication of training `model` (unconverted, unsharded: the MMDiT as built) under the
    TrainConfig `config` on `world_size` ranks. Per micro-batch the live network all-gathers its blocks for
    each forward it runs (the graded pass, the self-evaluation's unconditional pass, the auxiliary pass when
    on) and again in backward when blocks are resharded after forward (else once in all); the EMA copy gathers once (its
    conditional pass); gradients are reduce-scattered once, in fp32. The root's parameters (embedders, final
    layer) are counted like a block's: small beside the blocks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    share = (world_size - 1) / world_size
    parallel = config.parallel
    param_bytes = 2 if param_dtype_for(parallel, torch.device("cuda")) == torch.bfloat16 else 4
    fp8_names = set()
    if config.fp8.float8_all_gather:
        fp8_names = {f"{name}.weight" for name, how in fp8_plan(model, config.fp8).items() if how == "fp8"}
    live = sum(p.numel() * (1 if name in fp8_names else param_bytes) for name, p in model.named_parameters())
    ema = sum(p.numel() * param_bytes for p in model.parameters())
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    objective = config.objective
    aux = objective.aux_start is not None and objective.aux_start < config.steps
    forwards = 1 + int(objective.self_eval) + int(aux)
    reshard = parallel.reshard_after_forward if parallel.reshard_after_forward is not None else world_size > 1
    # blocks freed after forward: each forward gathers, and backward again for each graded pass (main, aux);
    # kept gathered: the first forward's gather serves the step
    live_gathers = forwards + 1 + int(aux) if reshard else 1
    accum = config.optim.grad_accum
    return CommVolume(
        all_gather_bytes=round(share * accum * (live_gathers * live + int(objective.self_eval) * ema)),
        reduce_scatter_bytes=round(share * accum * grads),
        gathers_per_step=accum * (live_gathers + int(objective.self_eval)),
    )
