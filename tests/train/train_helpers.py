"""Helpers of the trainer tests: a small text corpus, a tiny model, a fast TrainConfig."""

from __future__ import annotations

import gc
import os
import random
import socket
import traceback
from pathlib import Path

import memlm
from memlm.config import ModelConfig
from memlm.train import TrainConfig, distributed

WORDS = "the quick brown fox jumps over a lazy dog and then runs away from the big red barn".split()


def write_corpus(root: Path, documents: int = 40, lines: int = 30, seed: int = 0) -> Path:
    """`documents` text files of random words from a small vocabulary (quick to learn)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines))
        (root / f"doc{i:03d}.txt").write_text(text + "\n")
    return root


def tiny_model() -> ModelConfig:
    return memlm.config.resolve("seed-tiny", layers=2, width=32, seq_len=32, **{"attention.heads": 2})


def fast_config(corpus: Path, out: Path, **changes) -> TrainConfig:
    """A TrainConfig that trains the tiny model for a few CPU seconds at most."""
    base = dict(data=str(corpus), fractions=(0.8, 0.1, 0.1), out=str(out), steps=10, batch_size=4, lr=3e-3,
                warmup_steps=2, eval_every=5, eval_batches=1, checkpoint_every=5, log_every=1, sample_bytes=4,
                device="cpu")
    base.update(changes)
    return TrainConfig(**base)


# ----- two gloo ranks on the CPU (tests of DDP and FSDP) ----------------------------------

def free_port() -> int:
    """A free TCP port on the loopback address for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int) -> distributed.Dist:
    """Join a two-rank gloo process group on the CPU as `rank`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return distributed.setup("cpu")


def as_rank(rank: int, port: int, body, *args) -> None:
    """`body(info, *args)` as `rank` of a two-rank gloo group (mp.spawn's function), then leave the
    group. The group is destroyed only after body's locals are gone: a DistributedDataParallel
    Reducer that outlives it destroys it while holding the GIL, and a gloo thread still releasing
    its last allreduce's tensors (which takes the GIL) then deadlocks the rank for good (seen on a
    2-core CI machine; memlm.train.train frees its trainer first for the same reason)."""
    info = join(rank, port)
    failure = None
    try:
        body(info, *args)
    except BaseException:  # keep the text, not the exception: its traceback would keep body's frame alive
        failure = traceback.format_exc()
    gc.collect()
    distributed.teardown(info)
    if failure is not None:
        raise RuntimeError(failure)


class Interleaved:
    """One process's stand-in for two ranks: rank 0's batch, then rank 1's, then rank 0's..."""

    def __init__(self, loaders):
        self.loaders, self.turn = loaders, 0

    def next_batch(self):
        batch = self.loaders[self.turn].next_batch()
        self.turn = (self.turn + 1) % len(self.loaders)
        return batch

    def state_dict(self):
        return {"turn": self.turn, "loaders": [loader.state_dict() for loader in self.loaders]}
