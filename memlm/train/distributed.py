"""Data parallelism: one process per device, started by `torchrun --nproc_per_node N`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); with
WORLD_SIZE > 1 the trainer joins a process group (NCCL on CUDA, gloo on CPU) and wraps the
model in DistributedDataParallel. Without torchrun it is a single process of world size 1
and nothing here touches torch.distributed. With --parallel fsdp the model is sharded instead
of wrapped (memlm.train.fsdp).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from memlm.device import pick_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1



def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if world_size == 1:
        return Dist(0, 1, 0, chosen)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:  # share the cores between the ranks of this host
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo",
                                device_id=chosen if chosen.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, chosen)


def wrap(model: torch.nn.Module, info: Dist, find_unused: bool = False) -> torch.nn.Module:
    """The module each step runs: `model` itself in one process, else DistributedDataParallel over
    it (find_unused: memory mechanisms use some weights only on some steps)."""
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def teardown(info: Dist) -> None:
    """Leave the process group. Call it once the wrapped model is unreferenced: a DDP Reducer that
    outlives the group destroys it while holding the GIL, and a gloo thread still releasing its
    last allreduce's tensors (which takes the GIL) then deadlocks the process at exit. Collected
    here (cycles included), the Reducer leaves the group to destroy_process_group, which drops
    it without the GIL."""
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over the ranks (in place; the tensor itself without data parallelism)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_float(info: Dist, value: float) -> float:
    """Rank 0's value on every rank (keeps decisions such as 'time is up' identical everywhere)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def all_gather_objects(info: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, indexed by rank (picklable objects; tensors should be on the CPU)."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
