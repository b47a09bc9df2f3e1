"""Data parallelism on the CPU: two gloo processes train exactly like one process that
accumulates the two ranks' batches; a checkpoint resumes on another number of ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import Interleaved, fast_config, as_rank, free_port, tiny_model

from memlm.data import RandomWindows
from memlm.train import Trainer, distributed, train
from memlm.train.metrics import read

STEPS, BATCH = 4, 4


def worker(info: distributed.Dist, corpus: Path, out: Path) -> None:
    rank = info.rank
    trainer = Trainer(tiny_model(), fast_config(corpus, out, steps=STEPS, batch_size=BATCH, checkpoint_every=STEPS),
                      info)
    trainer.fit()
    torch.save(trainer.model.state_dict(), out.parent / f"rank{rank}.pt")


def test_two_gloo_ranks_match_one_process_with_gradient_accumulation(corpus, tmp_path):
    out = tmp_path / "ddp" / "run"
    mp.spawn(as_rank, args=(free_port(), worker, corpus, out), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # one process, grad_accum=2, fed rank 0's and rank 1's batches in turn: the same optimizer steps
    reference = Trainer(tiny_model(), fast_config(corpus, tmp_path / "single", steps=STEPS, batch_size=BATCH,
                                                  grad_accum=2), distributed.setup("cpu"))
    reference.loader = Interleaved([RandomWindows(reference.train_split, BATCH, 32, seed=0, rank=r, world_size=2)
                                    for r in (0, 1)])
    assert reference.tokens_per_step == 2 * BATCH * 32
    reference.fit()
    ddp_losses = [r["loss"] for r in read(out) if r["kind"] == "train"]
    single_losses = [r["loss"] for r in read(tmp_path / "single") if r["kind"] == "train"]
    assert len(ddp_losses) == STEPS
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5)
    for name, p in reference.model.state_dict().items():
        torch.testing.assert_close(rank0[name], p, atol=1e-5, rtol=0, msg=name)

    # resume the two-rank run in one process: the data order is re-derived, the counters go on
    summary = train(tiny_model(), fast_config(corpus, out, steps=STEPS + 2, batch_size=BATCH, resume=True))
    assert summary["steps"] == STEPS + 2
    assert summary["tokens"] == STEPS * 2 * BATCH * 32 + 2 * BATCH * 32
    assert [r["step"] for r in read(out) if r["kind"] == "train"] == list(range(1, STEPS + 3))


def memory_worker(info: distributed.Dist, corpus: Path, out: Path, overrides: dict) -> None:
    rank = info.rank
    trainer = Trainer(tiny_model().replace(**overrides),
                      fast_config(corpus, out, steps=STEPS, batch_size=2, checkpoint_every=STEPS), info)
    trainer.fit()
    torch.save({"weights": trainer.model.state_dict(), "position": trainer.state.position},
               out.parent / f"rank{rank}.pt")


def test_two_gloo_ranks_train_a_memory_model_in_step(corpus, tmp_path):
    """Streams, carried state, compressor and kNN stores under DDP: the ranks stay identical."""
    out = tmp_path / "ddp-memory" / "run"
    overrides = {"memory.xl.length": 32, "memory.compressive.rate": 4, "memory.compressive.length": 8,
                 "memory.knn.layers": [1], "memory.knn.capacity": 128}
    mp.spawn(as_rank, args=(free_port(), memory_worker, corpus, out, overrides), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / "ddp-memory" / f"rank{r}.pt") for r in (0, 1))
    assert rank0["position"] == rank1["position"] == STEPS * 32
    for name, p in rank0["weights"].items():
        assert torch.equal(p, rank1["weights"][name]), name
    initial = Trainer(tiny_model().replace(**overrides), fast_config(corpus, tmp_path / "fresh", steps=1),
                      distributed.setup("cpu")).model.state_dict()
    assert not torch.equal(initial["blocks.1.attention.knn.gate"], rank0["weights"]["blocks.1.attention.knn.gate"])
