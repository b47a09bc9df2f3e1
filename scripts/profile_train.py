"""Profile the Trainer's own training step (memlm.train.Trainer.train_step) on a GPU.

    python scripts/profile_train.py seed-xl-small [--steps 40] [--override k=v ...] [--train k=v ...]

Where `scripts/profile_step.py` times a bare compiled step on random tokens, this builds the
real Trainer (its loader, state resets at document starts, gradient clipping, optimizer and
compiled model) and times `train_step` after a compile warm-up, then prints torch.profiler's
tables of the slowest CPU-side and CUDA-side operations of a few steps. A gap between the two
scripts' tokens/s points at what the Trainer adds. Recompilations are counted through
torch._dynamo's counters.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import memlm
from memlm.train import distributed
from memlm.train.config import TrainConfig
from memlm.train.trainer import Trainer


def parse(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (after 6 warm-up steps)")
    parser.add_argument("--override", nargs="*", default=[], help="dotted model overrides key=value")
    parser.add_argument("--train", nargs="*", default=[], help="TrainConfig fields key=value (ints/floats parsed)")
    parser.add_argument("--rows", type=int, default=20, help="operations listed per table")
    args = parser.parse_args()

    model_config = memlm.resolve(args.preset, **dict(item.split("=", 1) for item in args.override))
    train = {key: parse(value) for key, value in (item.split("=", 1) for item in args.train)}
    config = TrainConfig(steps=10_000, out=tempfile.mkdtemp(prefix="profile-train-"), sample_bytes=0, **train)
    trainer = Trainer(model_config, config, distributed.setup(config.device), args.preset)

    def run(steps: int) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        return (time.perf_counter() - started) / steps

    from torch._dynamo.utils import counters
    started = time.perf_counter()
    run(6)
    print(f"warm-up (compile) {time.perf_counter() - started:.1f} s; graph breaks "
          f"{sum(counters['graph_break'].values())}, frames compiled {counters['stats']['unique_graphs']}")
    seconds = run(args.steps)
    tokens = trainer.tokens_per_step
    print(f"{args.preset} trainer step B{trainer.config.batch_size} T{trainer.seq_len}: {seconds * 1e3:.1f} ms/step, "
          f"{tokens / seconds:,.0f} tokens/s; frames compiled after timing {counters['stats']['unique_graphs']}")

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run(3)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
