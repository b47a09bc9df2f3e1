"""Training: the loop (`train`, `Trainer`), its config, optimizer, schedules and checkpoints.

    from memlm.train import TrainConfig, train
    summary = train(memlm.config.resolve("seed-tiny"), TrainConfig(steps=200), preset="seed-tiny")
"""

from memlm.train.checkpoint import CheckpointError, load_model
from memlm.train.config import TrainConfig
from memlm.train.trainer import Trainer, TrainingError, train

__all__ = ["CheckpointError", "TrainConfig", "Trainer", "TrainingError", "load_model", "train"]
