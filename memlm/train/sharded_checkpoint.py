"""Checkpoints of sharded (FSDP) runs: weights and AdamW state as a distributed checkpoint.

    <run>/checkpoints/step-00000400/
        dcp/               torch.distributed.checkpoint (DCP): .metadata and one __<rank>_0.distcp
                           file per rank, each rank writing its own shards of {"model", "optim"}
        trainer.pt         as memlm.train.checkpoint writes it, less the optimizer (it is in dcp/)
        config.json
        manifest.json      the SHA-256 of every file above, dcp/ included

Weights and optimizer state are keyed by parameter name (torch.distributed.checkpoint.state_dict's
get_state_dict), not by rank or shard, and DCP re-shards on load: a checkpoint written by N ranks
loads into M ranks, or into one whole model in a process with no process group (`memlm eval`,
`generate`, `export` read it as they read safetensors). Every rank must see the same directory
(one file system shared by the nodes). The save is atomic as memlm.train.checkpoint's: rank 0
names a temporary directory, every rank writes its shards into it, rank 0 adds the rest and
renames it into place.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from memlm.train import checkpoint
from memlm.train.distributed import Dist, all_gather_objects


def save(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         trainer_state: dict[str, Any], config: dict[str, Any], info: Dist,
         pointers: tuple[str, ...] = ("latest",), files: dict[str, bytes] | None = None) -> Path:
    """Write the checkpoint of `step` (collective: every rank calls it); optimizer None: weights only.
    files: more files of the checkpoint, name -> contents (checkpoint.save's)."""
    final = Path(root) / f"step-{step:08d}"
    tmp = None if info.main and checkpoint.saved_already(final, pointers) else checkpoint.staging(final)
    tmp = all_gather_objects(info, tmp)[0]  # rank 0's choice everywhere
    if tmp is None:
        return final
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else \
        (get_model_state_dict(model), None)
    state = {"model": model_state} | ({"optim": optim_state} if optim_state is not None else {})
    try:
        if info.main:
            tmp.mkdir()
        _raise_anywhere(info, None)
        with _one_process_quietly():
            dcp.save(state, checkpoint_id=tmp / checkpoint.SHARDED, no_dist=not info.enabled)
        if info.main:
            checkpoint.commit(tmp, final, trainer_state, config, files)
        _raise_anywhere(info, None)
    except BaseException as e:
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, dcp.api.CheckpointException)) and not isinstance(e, _Gathered):
            _raise_anywhere(info, e)  # met here: tell the ranks waiting in _raise_anywhere
        raise
    if info.main:
        checkpoint.publish(final, pointers)
    _barrier(info)
    return final


class _Gathered(OSError):
    """An OSError of some rank, raised on every rank by `_raise_anywhere`."""


def _raise_anywhere(info: Dist, error: BaseException | None) -> None:
    """Collective: raise on every rank the OSError one rank met (the lowest rank's), else return.
    An error DCP wrapped is given as (errno, strerror), EIO and its last line when it has none."""
    mine = None if error is None else (getattr(error, "errno", None) or errno.EIO,
                                       getattr(error, "strerror", None) or str(error).strip().splitlines()[-1])
    failed = next((e for e in all_gather_objects(info, mine) if e is not None), None)
    if failed is not None:
        raise _Gathered(*failed)


def load(found: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint's weights (and, given `optimizer`, its AdamW state) into `model`,
    sharded over any number of ranks or whole; every file checked against the manifest first."""
    found = Path(found)
    _verify(found)
    with_optim = optimizer is not None
    model_state, optim_state = get_state_dict(model, optimizer) if with_optim else (get_model_state_dict(model), None)
    state = {"model": model_state} | ({"optim": optim_state} if with_optim else {})
    try:
        with _one_process_quietly():
            dcp.load(state, checkpoint_id=found / checkpoint.SHARDED, no_dist=not dist.is_initialized())
    except Exception as e:  # noqa: BLE001 (DCP wraps every rank's failure in CheckpointException)
        raise checkpoint.CheckpointError(f"cannot load {found / checkpoint.SHARDED}: "
                                         f"{str(e).strip().splitlines()[-1][:300]}") from None
    if with_optim:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])


def _verify(found: Path) -> None:
    """Check every file of dcp/ against the manifest: rank 0 reads them (once, not once a rank), and
    every rank raises its CheckpointError."""
    distributed = dist.is_initialized()
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            for name in _files(found):
                checkpoint.verify(found, name)
        except checkpoint.CheckpointError as e:
            error = str(e)
    if distributed:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = errors[0]
    if error is not None:
        raise checkpoint.CheckpointError(error)


def _files(found: Path) -> list[str]:
    """The manifest's names of the files under dcp/ (none for a checkpoint without manifest)."""
    manifest = found / checkpoint.MANIFEST
    if not manifest.is_file():
        return []
    try:
        names = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"cannot read the manifest {manifest}: {e}") from None
    return [name for name in names if name.startswith(checkpoint.SHARDED + "/")]


@contextmanager
def _one_process_quietly():
    """Without the warning DCP gives each time a process without a process group saves or loads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()
