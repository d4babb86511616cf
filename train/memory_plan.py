"""How much GPU memory a training run needs, and the activation checkpointing policy it can afford.

    plan = plan_activation_checkpointing(config, device_memory_bytes=80e9, world_size=8)
    plan.policy, plan.est_peak_bytes, plan.table   # auto: the cheapest policy whose peak fits

A rank's peak over one step is estimated in two parts:
- the state that lives through the step (static_state_bytes), from the parameter count: the fp32 shards of
  the live weights, AdamW's two moments and the EMA copy (each / world size), the live network's gathered
  compute weights (bf16, or FP8 for converted linears under FP8 all-gather): all of them when blocks stay
  gathered after forward (one rank), else the root's and the blocks in flight; and one block's unsharded
  gradients waiting for their reduce-scatter;
- everything the step allocates on top (activation_peak_bytes): the objective's own passes (SelfELoss with
  the graded forward, the EMA and live self-evaluation forwards, the auxiliary pass when on) and the backward,
  traced with torch's FakeTensorMode on the network built in its compute dtype under the policy's
  checkpoint wrapper (no memory, no GPU), counting live tensor storage with LiveBytes. Each gradient, as it
  arrives, becomes its fp32 shard (numel / world size), as FSDP2 reduce-scatters them block by block.
The trace runs the torch kernels on fake CPU tensors (SDPA's CPU flash attention keeps what GPU flash
attention keeps: the output and its log-sum-exp), eagerly: under torch.compile the partitioner may keep less.
The CUDA context, NCCL's buffers and the caching allocator's fragmentation are not in the estimate:
`parallel.memory_fraction` keeps room for them. FP8's activations are taken as bf16's (an upper bound: the
FP8 casts it saves are half the size of the bf16 inputs they stand for).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from selfe.train.config import AC_POLICIES, TrainConfig
from selfe.train.parallelize import apply_activation_checkpointing, param_dtype_for

GIB = 2**30
# fp32 copies of every parameter kept through the step, sharded: the weights, AdamW's exp_avg and exp_avg_sq,
# the EMA copy (the gradients' shards are made during the step: activation_peak_bytes traces them)
SHARDED_FP32_COPIES = 4


class LiveBytes(TorchDispatchMode):
    """The bytes of live tensor storage, and their peak, while active: each storage an op outputs counts
    from then until it is freed (or resized: FSDP2 frees gathered weights by resizing their storage to 0).
    `track(tensors)` counts tensors made before. Works alike on real and fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes it holds now]
        self.live = self.peak = 0
        self._resize = None

    def track(self, tensors) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                for storage in get_untyped_storages(tensor):
                    self._add(storage)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._sizes:
            return
        cell = [storage.nbytes()]
        self._sizes[storage] = cell
        self._change(cell[0])
        weakref.finalize(storage, self._change_by_cell, cell)

    def _change_by_cell(self, cell: list[int]) -> None:
        self._change(-cell[0])
        cell[0] = 0

    def _change(self, delta: int) -> None:
        self.live += delta
        self.peak = max(self.peak, self.live)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        cell = self._sizes.get(storage)
        if cell is None:
            self._add(storage)
        else:
            self._change(storage.nbytes() - cell[0])
            cell[0] = storage.nbytes()

    def __enter__(self) -> LiveBytes:
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int):
            result = original(storage, size)
            tracker._resized(storage)
            return result

        self._resize, torch.UntypedStorage.resize_ = original, resize_
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # A view or an in-place result shares its input's storage: not new memory, even where the input was
        # made before tracking began (a weight's transpose)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {id(storage) for t in tensors for storage in get_untyped_storages(t)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                for storage in get_untyped_storages(tensor):
                    if id(storage) not in inputs:
                        self._add(storage)
        return out


@dataclass(frozen=True)
class Candidate:
    """One policy's estimate. fits: the peak is within the budget (device memory x memory_fraction)."""

    policy: str
    static_bytes: int
    activation_bytes: int
    fits: bool | None  # None: no device memory given (a CPU run)

    @property
    def est_peak_bytes(self) -> int:
        return self.static_bytes + self.activation_bytes


@dataclass(frozen=True)
class Plan:
    """The policy the run uses, its estimated peak per rank, and every policy estimated (cheapest compute
    first). budget_bytes: device memory x parallel.memory_fraction (None on a CPU run)."""

    policy: str
    est_peak_bytes: int | None  # None: not estimated
    table: tuple[Candidate, ...]
    world_size: int
    budget_bytes: int | None

    def describe(self) -> list[str]:
        """Lines for the start-up banner."""
        budget = f"{size_text(self.budget_bytes)} budget" if self.budget_bytes else "no memory budget (CPU)"
        peak = "not estimated" if self.est_peak_bytes is None else f"est. peak {size_text(self.est_peak_bytes)}"
        lines = [f"activation checkpointing: {self.policy} ({peak} per rank of {self.world_size}; {budget})"]
        for c in self.table:
            fits = {True: "  fits", False: "  too big", None: ""}[c.fits]
            lines.append(
                f"  {c.policy:9} {size_text(c.est_peak_bytes):>10} = state {size_text(c.static_bytes)} + "
                f"step {size_text(c.activation_bytes)}{fits}"
            )
        return lines


def size_text(n: int) -> str:
    """Bytes in GiB, or in MiB below one GiB (a small model's plan)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def planned_shapes(config: TrainConfig) -> tuple[int, int, int]:
    """(per-rank batch, resolution, text tokens) of the run's largest micro-batch: the largest batch of its
    stages, the schedule's higher resolution, the source's text length fitted up to its text bucket."""
    data = config.data
    resolution = max(data.resolution, data.high_resolution or 0)
    tokens = data.text_length if data.source in ("procedural", "synthetic") else data.t5_max_length
    if data.text_bucket is not None:
        bucket = data.text_bucket
        while bucket < tokens:
            bucket *= 2
        tokens = bucket
    return max([data.batch_size, *(size for _, size in data.batch_stages)]), resolution, tokens


def static_state_bytes(config: TrainConfig, world_size: int, device_type: str = "cuda") -> int:
    """The bytes per rank that live through the step (module docstring), from the parameter count."""
    with torch.device("meta"):
        model = _build(config, torch.float32)
    params = [(name, p.numel()) for name, p in model.named_parameters()]
    total = sum(n for _, n in params)
    compute = 2 if param_dtype_for(config.parallel, torch.device(device_type)) == torch.bfloat16 else 4
    fp8 = set()
    if config.fp8.float8_all_gather:
        from selfe.components.fp8 import fp8_plan

        fp8 = {f"{name}.weight" for name, how in fp8_plan(model, config.fp8).items() if how == "fp8"}
    gathered = {name: n * (1 if name in fp8 else compute) for name, n in params}
    per_block = [
        sum(gathered[f"{stack}.{i}.{name}"] for name, _ in block.named_parameters())
        for stack in ("double_blocks", "single_blocks")
        for i, block in enumerate(getattr(model, stack))
    ]
    reshard = config.parallel.reshard_after_forward
    if reshard is None:
        reshard = world_size > 1
    if reshard:  # the root stays gathered; blocks come and go: the current one and those prefetched
        in_flight = (1 + config.parallel.prefetch_blocks) * max(per_block)
        gathered_bytes = sum(gathered.values()) - sum(per_block) + in_flight
    else:
        gathered_bytes = sum(gathered.values())
    # In backward a block's unsharded gradients wait whole for their reduce-scatter
    block_grads = max(sum(p.numel() for p in b.parameters()) for b in (*model.double_blocks, *model.single_blocks))
    return SHARDED_FP32_COPIES * 4 * total // world_size + gathered_bytes + block_grads * compute


def activation_peak_bytes(config: TrainConfig, policy: str, world_size: int = 1, device_type: str = "cuda") -> int:
    """The peak of what one micro-batch's objective and backward allocate (the gradients' fp32 shards
    included), traced on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from selfe.method.objective import SelfELoss
    from selfe.train.sources import SyntheticSource

    dtype = param_dtype_for(config.parallel, torch.device(device_type))
    batch, resolution, tokens = planned_shapes(config)
    shapes = {"batch_size": batch, "resolution": resolution, "high_resolution": None, "text_length": tokens}
    data = dataclasses.replace(config.data, source="synthetic", **shapes)
    objective = config.objective
    aux = objective.aux_start is not None and objective.aux_start < config.steps
    iteration = objective.aux_start if aux else max(objective.tau_warmup, 0)  # tau at its end: full self-eval
    with FakeTensorMode(), torch.device("cpu"):
        model = _build(config, dtype)
        ema = _build(config, dtype).requires_grad_(False)  # a deep copy would bring a fake mode of its own
        apply_activation_checkpointing(model, policy)
        shards: list[torch.Tensor] = []

        def reduce_scatter(param: torch.Tensor) -> None:  # FSDP2: the gradient -> its fp32 shard, kept
            shards.append(torch.empty(-(-param.numel() // world_size), dtype=torch.float32))
            param.grad = None

        for param in model.parameters():
            param.register_post_accumulate_grad_hook(reduce_scatter)
        step_batch = SyntheticSource(data, config.model, 1).next_step(want_fake=aux)[0]
        generator = torch.Generator().manual_seed(0)
        with LiveBytes() as tracker:
            loss, _ = SelfELoss(objective)(model, ema, step_batch, iteration, generator)
            loss.backward()
    return tracker.peak


def estimate(config: TrainConfig, policy: str, world_size: int, device_type: str = "cuda") -> Candidate:
    return Candidate(
        policy,
        static_state_bytes(config, world_size, device_type),
        activation_peak_bytes(config, policy, world_size, device_type),
        fits=None,
    )


def plan_activation_checkpointing(
    config: TrainConfig,
    device_memory_bytes: int | None,
    world_size: int,
    device_type: str = "cuda",
    estimate_fixed: bool = True,
) -> Plan:
    """The run's activation checkpointing policy and its estimated peak per rank. `auto` estimates every
    policy and takes the cheapest in compute (none, selective, full) that fits device_memory_bytes x
    parallel.memory_fraction (full when none fits: the smallest peak there is; with no device memory
    given, none); a fixed policy is estimated alone, or not at all with estimate_fixed=False (est_peak_bytes
    None: a CPU run need not spend a trace). device_type: where the run computes ("cuda": bf16 compute).
    The estimates are of eager execution: under torch.compile the partitioner may keep less."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    chosen = config.parallel.activation_checkpointing
    budget = None if device_memory_bytes is None else int(device_memory_bytes * config.parallel.memory_fraction)
    if chosen != "auto" and not estimate_fixed:
        return Plan(chosen, None, (), world_size, budget)
    policies = AC_POLICIES if chosen == "auto" else (chosen,)
    table = []
    for policy in policies:
        candidate = estimate(config, policy, world_size, device_type)
        fits = None if budget is None else candidate.est_peak_bytes <= budget
        table.append(dataclasses.replace(candidate, fits=fits))
    if chosen == "auto":
        fitting = [c for c in table if c.fits is not False]
        pick = fitting[0] if fitting else table[-1]
    else:
        pick = table[0]
    return Plan(pick.policy, pick.est_peak_bytes, tuple(table), world_size, budget)


def device_memory_bytes(device: torch.device) -> int | None:
    """The GPU's total memory, or None for a CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def _build(config: TrainConfig, dtype: torch.dtype) -> nn.Module:
    """The MMDiT with its parameters in `dtype` (made so: a fake module cannot be cast in place)."""
    from selfe.network.model import MMDiT

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MMDiT(config.model)
    finally:
        torch.set_default_dtype(previous)
    model.validate_inputs = False
    return model
