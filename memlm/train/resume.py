"""A run's checkpoints and resuming from them: what a checkpoint keeps of the trainer (counters,
optimizer, every rank's loader, RNG and memory state), the best weights kept for the test,
which checkpoint `--resume` continues, the configs it continues with, and the state put back.

The steps after a resume are the steps an uninterrupted run would have taken. When the number
of ranks changed, the loaders and RNGs are re-seeded from (seed, step) instead: the data order
then differs from an uninterrupted run, as it must.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.config import ModelConfig
from memlm.train import checkpoint, distributed, sharded_checkpoint
from memlm.train.config import TrainConfig
from memlm.train.optim import keep_fused


def derived_seed(*values: int) -> int:
    """A seed that depends on every value (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def checkpoint_to_resume(out: Path, main: bool) -> tuple[Path | None, str | None]:
    """(the checkpoint --resume continues, None) or, for a run directory that holds no complete
    checkpoint (such as one killed inside its first save, which then starts from the beginning,
    its leftovers removed by rank 0), (None, a note saying so)."""
    try:
        return checkpoint.find(out), None
    except checkpoint.CheckpointError:
        if not (out / checkpoint.CONFIG).is_file():
            raise
    if main and (out / checkpoint.CHECKPOINTS).is_dir():
        checkpoint.remove_leftovers(out / checkpoint.CHECKPOINTS)
    return None, "no complete checkpoint to resume: starting from the beginning"


def resumed_configs(saved: dict[str, Any], given: TrainConfig,
                    config_type: type = ModelConfig) -> tuple[Any, TrainConfig]:
    """The saved configs of a run; a budget given now replaces the saved one."""
    model_config = config_type.from_dict(saved["model"])
    train_config = dataclasses.replace(TrainConfig.from_dict(saved["train"]), out=given.out, resume=True)
    if any(v is not None for v in (given.steps, given.tokens, given.minutes)):
        train_config = dataclasses.replace(train_config, steps=given.steps, tokens=given.tokens, minutes=given.minutes)
    return model_config, train_config


def sharded(trainer) -> bool:
    """Whether the run keeps distributed checkpoints (--parallel fsdp, at any number of ranks)."""
    return trainer.config.parallel == "fsdp"


def trainer_state(trainer, ranks: list[dict]) -> dict[str, Any]:
    """What a checkpoint keeps of the trainer besides the weights; `ranks`: every rank's `rank_state`.
    The optimizer state of a sharded run is in its distributed checkpoint instead."""
    state = {"step": trainer.step, "tokens": trainer.tokens, "elapsed": trainer.elapsed,
             "decay_start": trainer.decay_start, "best_bpb": trainer.best_bpb,
             "best_evaluated_step": trainer.best_evaluated_step, "skipped_steps": trainer.skipped_steps,
             "world_size": trainer.info.world_size, "ranks": ranks}
    return state if sharded(trainer) else {**state, "optimizer": trainer.optimizer.state_dict()}


def load(trainer, found: Path) -> None:
    """Resume from checkpoint `found`: weights, optimizer and trainer state (collective for a
    sharded checkpoint, which loads at any number of ranks)."""
    if checkpoint.is_sharded(found):
        sharded_checkpoint.load(found, trainer.model, trainer.optimizer)
    else:
        checkpoint.load_weights(trainer.model, found, trainer.device)
    restore(trainer, checkpoint.load_trainer_state(found))
    keep_fused(trainer.optimizer)  # a checkpoint of an earlier memlm may say fused=False


def rank_state(trainer) -> dict[str, Any]:
    """This rank's loader, RNG and memory state."""
    return {"loader": trainer.loader.state_dict(), "rng": torch.get_rng_state(),
            "memory": trainer.state.to("cpu").state_dict() if trainer.state is not None else None,
            "cuda_rng": torch.cuda.get_rng_state(trainer.device) if trainer.device.type == "cuda" else None}


def restore(trainer, state: dict[str, Any]) -> None:
    """Put a checkpoint's trainer state back (the inverse of `trainer_state`)."""
    trainer.step, trainer.tokens, trainer.elapsed = state["step"], state["tokens"], state["elapsed"]
    trainer.decay_start, trainer.best_bpb = state["decay_start"], state["best_bpb"]
    trainer.best_evaluated_step = state.get("best_evaluated_step")
    trainer.skipped_steps = state.get("skipped_steps", 0)
    if "optimizer" in state:  # else loaded from the distributed checkpoint
        trainer.optimizer.load_state_dict(state["optimizer"])
    info, device = trainer.info, trainer.device
    if state["world_size"] == info.world_size:
        mine = state["ranks"][info.rank]
        trainer.loader.load_state_dict(mine["loader"])
        if mine.get("memory") is not None:
            trainer.state = trainer.model.load_state(mine["memory"], device)
        torch.set_rng_state(mine["rng"])
        if mine["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
    else:  # a different number of ranks: fresh data order and RNG, derived from (seed, step)
        seed = trainer.config.seed
        trainer.loader = trainer.make_loader(derived_seed(seed, trainer.step))  # streams restart, memory empty
        torch.manual_seed(derived_seed(seed, trainer.step, info.rank))


def weights_finite(trainer) -> bool:
    """Whether every weight is finite (each rank checks its shards of a sharded model; collective)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
    bad = torch.tensor([float(not all(torch.isfinite(p).all() for p in local))], device=trainer.device)
    return distributed.all_reduce_sum(trainer.info, bad).item() == 0


def write_checkpoint(trainer, ranks: list[dict]) -> None:
    """Save the run at its step as checkpoints/latest, and as best when this step's evaluation gave
    the best bpb (only then: best always points at an evaluated step). Rank 0 writes; every rank
    writes its shards of a sharded run."""
    best = trainer.config.keep_best and trainer.best_evaluated_step == trainer.step
    pointers = ("latest", "best") if best else ("latest",)
    directory = trainer.out / checkpoint.CHECKPOINTS
    try:
        save_checkpoint(trainer, trainer.step, trainer_state(trainer, ranks), pointers, trainer.optimizer)
    except OSError as e:  # a full disk, a read-only or vanished directory: the save removed its partial copy
        raise checkpoint.CheckpointError(
            f"{e.strerror or e} while writing checkpoint step {trainer.step} in {directory}; "
            f"the previous checkpoint is intact") from None


def restore_best(trainer) -> int:
    """Put back the weights of the best validation evaluation (early stopping) for the test; the
    step they come from. A resumed run that has not improved since takes checkpoints/best."""
    if trainer.best_weights is not None:
        trainer.model.load_state_dict(trainer.best_weights)
        return trainer.best_step
    try:
        best = checkpoint.find(trainer.out, "best")
    except checkpoint.CheckpointError:
        return trainer.step  # never evaluated, or no best kept: the last weights
    checkpoint.load_weights(trainer.model, best, trainer.device)
    return checkpoint.load_trainer_state(best)["step"]


def save_best_weights(trainer) -> None:
    """Keep the restored best-validation weights as checkpoints/best when no checkpoint was written
    at their step (races checkpoint only after the budget): `memlm eval`, `generate` and `memorize`
    can then read the weights the test scored. A weights checkpoint: its trainer state holds the
    step and the best bpb only, no optimizer or data state to resume from. Rank 0 writes; every
    rank writes its shards of a sharded run."""
    state = {"step": trainer.best_step, "best_bpb": trainer.best_bpb, "weights_only": True}
    save_checkpoint(trainer, trainer.best_step, state, ("best",), None)


def save_checkpoint(trainer, step: int, state: dict[str, Any], pointers: tuple[str, ...],
                    optimizer: torch.optim.Optimizer | None) -> None:
    """Write checkpoints/step-<step> with the trainer `state` and point `pointers` at it: rank 0
    writes a whole checkpoint, or every rank its shards of a sharded run (optimizer None: weights only)."""
    directory, files = trainer.out / checkpoint.CHECKPOINTS, trainer.checkpoint_files()
    if sharded(trainer):
        sharded_checkpoint.save(directory, step, trainer.model, optimizer, state, trainer.run_config(),
                                trainer.info, pointers, files=files)
    elif trainer.info.main:
        checkpoint.save(directory, step, trainer.model, state, trainer.run_config(), pointers, files=files)
