"""Fully sharded data parallelism (FSDP2) and activation checkpointing, applied from outside.

    prepare(model, config, info)     what the trainer calls: check, checkpoint_blocks, shard as TrainConfig asks
    shard(model, info, param_dtype)  fully_shard(block) for each block, then fully_shard(model) (root:
                                     embedding, tied head, final norm, memory-token and other top-level weights)
    reduce_replicated(model, info)   average the gradients of the few parameters left whole (below)
    clip_grad_norm_(model, max)      one global norm over sharded (DTensor) and whole gradients
    checkpoint_blocks(model)         recompute each block's activations in the backward pass

FSDP2 ("PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", Zhao et al., arXiv
2304.11277; the per-parameter DTensor sharding of `torch.distributed.fsdp.fully_shard`): each rank
keeps 1/N of every weight, gradient and AdamW moment; a block's weights are all-gathered just
before its forward (and again for its backward) and freed after; gradients are reduce-scattered.

Parameters kept whole on every rank (`replicated`), outside the sharding (fully_shard's
`ignored_params`), their gradients averaged by `reduce_replicated`:
- 0-d parameters (ScaleNorm's scale, the QK-norm scale): fully_shard shards dim 0 and refuses them;
- adaptive spans (H,): read outside their block's forward (the span penalty, `spans()`) and clamped
  after the optimizer step, where a sharded parameter would be a shard.
A kNN layer writes its completed segment with its block's key projection after the block's
forward, and compressive memory compresses a layer's leaving memories with its block's attention
and norm (detached: only the compressor, a root weight, gets their gradient) after the last
block's forward: such blocks (`gathered_blocks`) keep their gathered weights from their forward to
their backward (`reshard_after_forward=False`), their weights whole on every rank between the two
(under compressive memory, every block: the memory saved is then that of the gradients and AdamW
moments, as ZeRO-2). Slot memory (reads and writes with a block's weights outside its forward,
with gradients) is refused with a clear error (`check`).
Memory states (XL memory, kNN stores) are per rank, as under DDP, and are not sharded.

Mixed precision: a bf16 run (--precision bf16, or auto on CUDA) shards with FSDP2's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the all-gathered weights a block
computes with are bf16 (half the all-gather traffic and memory of fp32; autocast would cast them
to bf16 for its matmuls anyway), the gradients are reduce-scattered in fp32, and the sharded
master weights and AdamW moments stay fp32. Departure from DDP under autocast: weights that
autocast keeps fp32 (norm and bias vectors) are rounded to bf16 too; the replicated parameters
above stay fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from memlm.memory.adaptive_span import AdaptiveSpan
from memlm.train.distributed import Dist

UNSHARDABLE = {"memory.ntm.layers": "slot memory reads and writes with a block's weights outside its forward"}
"""Model config fields that, when set, keep a model from being sharded, and why."""


def check(model_config, task: str = "lm") -> None:
    """Raise ValueError (one line) for a model or task FSDP cannot train here."""
    m = model_config.memory
    values = {"memory.ntm.layers": m.ntm.layers}
    for field, value in values.items():
        if value:
            raise ValueError(f"--parallel fsdp: {field} = {value}: {UNSHARDABLE[field]}, where its weights are "
                             f"shards; train this model with --parallel ddp")
    if task == "recall":
        raise ValueError("--parallel fsdp: the recall task scores recall on rank 0 alone; use --parallel ddp")


def prepare(model: nn.Module, config, info: Dist) -> nn.Module:
    """The trainer's model (on its device) as TrainConfig asks: activation checkpointing, and for
    --parallel fsdp under several ranks, sharded (checked first: `check`). One rank keeps it whole."""
    if (config.parallel == "fsdp" or config.activation_checkpointing) and not isinstance(
            getattr(model, "blocks", None), nn.ModuleList):
        raise ValueError(f"--parallel fsdp and --activation_checkpointing work on a model's blocks; "
                         f"{type(model).__name__} has no ModuleList `blocks`")
    if config.parallel == "fsdp":
        check(model.config, config.task)
    if config.activation_checkpointing:
        checkpoint_blocks(model, uncheckpointable(model.config))
    if config.parallel == "fsdp" and info.enabled:
        bf16 = config.precision == "bf16" or (config.precision == "auto" and info.device.type == "cuda")
        shard(model, info, torch.bfloat16 if bf16 else None)
    return model


def replicated(model: nn.Module) -> list[nn.Parameter]:
    """The parameters left whole on every rank (see the module docstring), in model order."""
    spans = {id(m.span) for m in model.modules() if isinstance(m, AdaptiveSpan)}
    return [p for p in model.parameters() if p.dim() == 0 or id(p) in spans]


def shard(model: nn.Module, info: Dist, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` (in place, already on its device) over the ranks of `info`: one FSDP unit per
    block and the root; `gathered_blocks` stay gathered from forward to backward. param_dtype: the dtype
    blocks compute with (gradients reduced in fp32; None = the weights' own). Returns the model
    (now an FSDPModule; its parameters DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    whole = {id(p) for p in replicated(model)}
    kept = gathered_blocks(model.config)
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if id(p) in whole},
                    reshard_after_forward=i not in kept, mp_policy=policy)
    fully_shard(model, mesh=mesh, ignored_params=set(replicated(model)), mp_policy=policy)
    return model


def gathered_blocks(model_config) -> set[int]:
    """The blocks whose weights are used after their forward (kNN writes, compression of leaving
    memories), which therefore stay gathered until their backward."""
    m = model_config.memory
    compressing = range(model_config.layers) if m.compressive.rate else ()
    return set(m.knn.layers or ()) | set(compressing)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def reduce_replicated(model: nn.Module, info: Dist) -> None:
    """Average the gradients of the replicated parameters over the ranks (FSDP reduce-scatters
    the others itself). A parameter without a gradient on every rank keeps none."""
    if not (info.enabled and is_sharded(model)):
        return
    params = replicated(model)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=info.device)
    dist.all_reduce(present)  # (P,) how many ranks hold each gradient
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0, device=info.device)
    dist.all_reduce(flat)
    flat /= info.world_size
    for p, n, g in zip(params, present.tolist(), flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone() if n > 0 else None


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip all gradients to a global L2 norm of `max_norm` (inf = measure only); returns the norm
    before clipping as a 0-d plain tensor. torch.nn.utils.clip_grad_norm_ stacks the per-parameter
    norms, which cannot mix DTensors (sharded gradients) with plain tensors (replicated ones):
    here each kind is measured apart, the sharded norm made whole by `full_tensor()`."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain) ** 2
    total = squares.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in sharded:
            g.to_local().mul_(coef)
        for g in plain:
            g.mul_(coef)
    return total


def set_gradient_sync(train_model: nn.Module, model: nn.Module, sync: bool) -> None:
    """Reduce gradients in this backward pass (the last micro-step) or only accumulate them."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    elif isinstance(train_model, nn.parallel.DistributedDataParallel):
        train_model.require_backward_grad_sync = sync


def checkpoint_blocks(model: nn.Module, skip: tuple[int, ...] = ()) -> None:
    """Activation checkpointing ("Training Deep Nets with Sublinear Memory Cost", Chen et al., arXiv
    1604.06174) with torch.utils.checkpoint (non-reentrant): each block keeps only its inputs in
    the forward pass and runs again in the backward pass, dropout masks replayed from the saved RNG
    state. Blocks in `skip` are left alone: a kNN or slot-memory layer reads a store that the
    segment's own write changes before the backward pass, so running it again would read another
    memory. The block's forward is replaced on the instance, so weight names are unchanged."""
    for i, block in enumerate(model.blocks):
        if i not in skip and not getattr(block, "checkpointed", False):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            block.checkpointed = True


def uncheckpointable(model_config) -> tuple[int, ...]:
    """The layers `checkpoint_blocks` must skip: those reading kNN stores or slot memories."""
    m = model_config.memory
    return tuple(sorted(set(m.knn.layers or ()) | set(m.ntm.layers or ())))
