"""Training: the loop (`train`, `Trainer`), its config, optimizer, schedules and checkpoints.

    from memlm.train import TrainConfig, train
    summary = train(memlm.config.resolve("seed-tiny"), TrainConfig(steps=200), preset="seed-tiny")
    summary = train(None, TrainConfig(steps=200), model=my_model, callbacks=[MyCallback()])  # any such module
"""

from memlm.train.callbacks import Callback
from memlm.train.checkpoint import CheckpointError, load_model, load_tokenizer
from memlm.train.config import TrainConfig
from memlm.train.trainer import Trainer, TrainingError, train

__all__ = ["Callback", "CheckpointError", "TrainConfig", "Trainer", "TrainingError", "load_model", "load_tokenizer", "train"]
