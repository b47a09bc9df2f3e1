"""FSDP2 on the CPU: two gloo processes with sharded weights train like one process that
accumulates the two ranks' batches, and memory models (XL, kNN) like DDP; their distributed
checkpoints resume on one rank, and one rank's on two, continuing as the uninterrupted run does
(on the same number of ranks bit for bit); a save failing on one rank stops all in one line;
activation checkpointing leaves the gradients unchanged."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import Interleaved, fast_config, as_rank, free_port, tiny_model

import memlm
from memlm.data import RandomWindows
from memlm.train import Callback, Trainer, distributed, fsdp, train
from memlm.train.checkpoint import CheckpointError, load_model, load_trainer_state
from memlm.train.checkpoint import find as checkpoint_find
from memlm.train.metrics import read

STEPS, BATCH, SEQ = 4, 4, 32
TOL = 1e-5
"""Two ranks average their gradients in a reduce-scatter, one process sums its micro-steps: the
same numbers in another order, equal to float32 rounding (as the DDP test finds)."""


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole on rank 0 (collective; empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class KeepCheckpoint(Callback):
    """Copy checkpoints/step-<step> aside before the next save prunes it (rank 0)."""

    def __init__(self, step: int, to: Path):
        self.step, self.to = step, to

    def on_metrics(self, trainer, record):
        if record["kind"] == "train" and record["step"] == self.step + 1:
            shutil.copytree(trainer.out / "checkpoints" / f"step-{self.step:08d}", self.to)


def worker(info: distributed.Dist, corpus: Path, out: Path, changes: dict, keep: Path | None) -> None:
    rank = info.rank
    callbacks = [KeepCheckpoint(2, keep)] if keep is not None else []
    trainer = Trainer(tiny_model(), fast_config(corpus, out, **changes), info, callbacks=callbacks)
    shapes = {n: (tuple(p.shape), tuple(p.to_local().shape) if hasattr(p, "to_local") else None)
              for n, p in trainer.model.named_parameters()}
    trainer.fit()
    weights = full_weights(trainer.model)
    if rank == 0:
        torch.save({"weights": weights, "shapes": shapes}, out.parent / "rank0.pt")


def two_rank_stand_in(trainer: Trainer, loaders: list[dict] | None = None) -> Trainer:
    """Make a one-process trainer take two ranks' steps: grad_accum 2 over their interleaved batches
    (their loaders continued from `loaders`, the two ranks' saved states, when given)."""
    windows = [RandomWindows(trainer.train_split, BATCH, SEQ, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for window, state in zip(windows, loaders or ()):
        window.load_state_dict(state)
    trainer.loader = Interleaved(windows)
    trainer.config = dataclasses.replace(trainer.config, grad_accum=2)
    trainer.tokens_per_step = 2 * BATCH * SEQ
    return trainer


def train_records(run: Path) -> list[dict]:
    return [r for r in read(run) if r["kind"] == "train"]


def assert_same_weights(a: dict, b: dict, atol: float = TOL) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_fsdp_on_two_ranks_matches_one_process_and_resumes_on_one(corpus, tmp_path):
    fsdp_run, kept = tmp_path / "fsdp" / "run", tmp_path / "step-2"
    changes = dict(steps=STEPS, batch_size=BATCH, eval_every=2, checkpoint_every=2, parallel="fsdp")
    mp.spawn(as_rank, args=(free_port(), worker, corpus, fsdp_run, changes, kept), nprocs=2, join=True)
    saved = torch.load(tmp_path / "fsdp" / "rank0.pt")
    # sharded: each rank holds half the rows of every matrix; the 0-d scales stay whole
    assert saved["shapes"]["blocks.0.feedforward.up.weight"] == ((128, 32), (64, 32))
    assert saved["shapes"]["blocks.0.attn_norm.scale"] == ((), None)
    final = fsdp_run / "checkpoints" / "latest"
    assert sorted(p.name for p in (final / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in load_trainer_state(final)  # it is in dcp/

    # one process, grad_accum=2 over rank 0's and rank 1's batches in turn: the same steps
    single = tmp_path / "single"
    reference = two_rank_stand_in(Trainer(tiny_model(), fast_config(corpus, single, steps=STEPS, batch_size=BATCH),
                                          distributed.setup("cpu")))
    reference.fit()
    fsdp_records, single_records = train_records(fsdp_run), train_records(single)
    assert [r["step"] for r in fsdp_records] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):  # grad_norm: sharded and whole gradients measured together
        assert [r[key] for r in fsdp_records] == pytest.approx([r[key] for r in single_records], abs=TOL), key
    assert_same_weights(saved["weights"], reference.model.state_dict())

    # the distributed checkpoint loads whole in a process without a process group (memlm eval)
    model, _ = load_model(fsdp_run)
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved["weights"][name]), name

    # resume the step-2 checkpoint of the two ranks in one process that takes their two batches a step
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(kept, resumed / "checkpoints" / kept.name)
    (resumed / "checkpoints" / "latest").symlink_to(kept.name)
    ranks = load_trainer_state(kept)["ranks"]
    trainer = Trainer(tiny_model(), fast_config(corpus, resumed, steps=STEPS, resume=True), distributed.setup("cpu"))
    assert trainer.config.parallel == "fsdp" and trainer.step == 2
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 2  # AdamW's moments came back
    two_rank_stand_in(trainer, [r["loader"] for r in ranks]).fit()
    assert [r["loss"] for r in train_records(resumed)] == pytest.approx([r["loss"] for r in fsdp_records[2:]], abs=TOL)
    assert_same_weights(trainer.model.state_dict(), saved["weights"])


def resume_worker(info: distributed.Dist, corpus: Path, out: Path) -> None:
    """Resume a one-process run (grad_accum 2 over two ranks' batches of 4) on two ranks, each
    continuing its stand-in's loader in two micro-steps of 2 rows (the same windows: the loader
    draws them one by one), which FSDP accumulates without reducing the first."""
    rank = info.rank
    trainer = Trainer(tiny_model(), fast_config(corpus, out, steps=STEPS, resume=True), info)
    state = load_trainer_state(out / "checkpoints" / "latest")
    trainer.loader = RandomWindows(trainer.train_split, BATCH // 2, SEQ, rank=rank, world_size=2)
    trainer.loader.load_state_dict(state["ranks"][0]["loader"]["loaders"][rank])
    trainer.config = dataclasses.replace(trainer.config, grad_accum=2)
    trainer.fit()
    weights = full_weights(trainer.model)
    if rank == 0:
        torch.save({"weights": weights}, out.parent / "rank0.pt")


def test_fsdp_checkpoint_of_one_rank_resumes_on_two(corpus, tmp_path):
    run = tmp_path / "one" / "run"
    first = two_rank_stand_in(Trainer(tiny_model(), fast_config(corpus, run, steps=2, batch_size=BATCH,
                                                                parallel="fsdp"), distributed.setup("cpu")))
    first.fit()
    first.close()  # release the run directory for the ranks that resume it
    assert sorted(p.name for p in (run / "checkpoints" / "latest" / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    uninterrupted = two_rank_stand_in(Trainer(tiny_model(), fast_config(corpus, tmp_path / "single", steps=STEPS,
                                                                        batch_size=BATCH), distributed.setup("cpu")))
    uninterrupted.fit()

    mp.spawn(as_rank, args=(free_port(), resume_worker, corpus, run), nprocs=2, join=True)
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in train_records(tmp_path / "single")],
                                                         abs=TOL)
    assert_same_weights(torch.load(tmp_path / "one" / "rank0.pt")["weights"], uninterrupted.model.state_dict())

    # a damaged shard is named before anything is read
    shard = next((run / "checkpoints" / "latest" / "dcp").glob("*.distcp"))
    shard.write_bytes(b"\0" + shard.read_bytes()[1:])
    with pytest.raises(CheckpointError, match="distcp is corrupt"):
        load_model(run)


def memory_worker(info: distributed.Dist, corpus: Path, out: Path, overrides: dict, keep: Path | None,
                  resume: bool) -> None:
    rank = info.rank
    config = fast_config(corpus, out, steps=STEPS, batch_size=2, eval_every=2, checkpoint_every=2,
                         parallel="fsdp", resume=resume)
    trainer = Trainer(tiny_model().replace(**overrides), config, info,
                      callbacks=[KeepCheckpoint(2, keep)] if keep is not None else [])
    trainer.fit()
    whole = {id(p) for p in fsdp.replicated(trainer.model)}
    replicated = {n: p.detach() for n, p in trainer.model.named_parameters() if id(p) in whole}
    weights = full_weights(trainer.model)
    torch.save({"replicated": replicated, "weights": weights, "memory": trainer.state.to("cpu").state_dict()},
               out.parent / f"rank{rank}.pt")


def test_fsdp_trains_a_memory_model_and_resumes_it_exactly(corpus, tmp_path):
    """XL memory, feedback, adaptive spans and persistent vectors sharded: the parameters kept whole
    (scales, spans) stay equal on both ranks and are trained; the memory stays per rank; resumed on
    two ranks from its step-2 checkpoint the run ends bit for bit as the uninterrupted one."""
    overrides = {"memory.xl.length": 32, "memory.feedback.mode": "memory", "memory.adaptive_span.enabled": True,
                 "memory.adaptive_span.init": 0.5, "memory.persistent.vectors": 4}
    out, kept = tmp_path / "mem" / "run", tmp_path / "step-2"
    mp.spawn(as_rank, args=(free_port(), memory_worker, corpus, out, overrides, kept, False), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / "mem" / f"rank{r}.pt") for r in (0, 1))
    assert rank0["memory"]["position"] == rank1["memory"]["position"] == STEPS * SEQ
    spans = [n for n in rank0["replicated"] if n.endswith("span.span")]
    assert len(spans) == 2 and len(rank0["replicated"]) == 2 + 3 * 2 + 1  # spans, 3 scales a block, final norm
    initial = memlm.build(tiny_model().replace(**overrides)).state_dict()
    for name, p in rank0["replicated"].items():
        assert torch.equal(p, rank1["replicated"][name]), name
    assert all(not torch.equal(rank0["replicated"][n], initial[n]) for n in spans)

    resumed = tmp_path / "again" / "run"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(kept, resumed / "checkpoints" / kept.name)
    (resumed / "checkpoints" / "latest").symlink_to(kept.name)
    mp.spawn(as_rank, args=(free_port(), memory_worker, corpus, resumed, overrides, None, True), nprocs=2, join=True)
    again = torch.load(tmp_path / "again" / "rank0.pt")
    for name, p in rank0["weights"].items():
        assert torch.equal(p, again["weights"][name]), name
    assert [r["loss"] for r in train_records(resumed)] == [r["loss"] for r in train_records(out)][2:]
    torch.testing.assert_close(again["memory"], rank0["memory"], rtol=0, atol=0)  # rank 0's XL memory


def fault_worker(info: distributed.Dist, corpus: Path, out: Path) -> None:
    """Rank 0 alone finds the disk full when it completes the step-4 checkpoint."""
    import errno
    import faulthandler

    import memlm.train.checkpoint as checkpoint_module

    faulthandler.dump_traceback_later(60, exit=True)  # a rank left waiting fails the test, not hangs it
    rank = info.rank
    try:
        commit = checkpoint_module.commit

        def full_disk(tmp, final, *args):
            if final.name == "step-00000004":
                raise OSError(errno.ENOSPC, "No space left on device")
            commit(tmp, final, *args)
        if rank == 0:
            checkpoint_module.commit = full_disk
        trainer = Trainer(tiny_model(), fast_config(corpus, out, steps=4, eval_every=2, checkpoint_every=2,
                                                    parallel="fsdp"), info)
        try:
            trainer.fit()
            result = "finished"
        except CheckpointError as e:
            result = str(e)
        (out.parent / f"rank{rank}.txt").write_text(result)
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_fsdp_a_save_failing_on_one_rank_stops_every_rank_in_one_line(corpus, tmp_path):
    out = tmp_path / "fault" / "run"
    mp.spawn(as_rank, args=(free_port(), fault_worker, corpus, out), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / "fault" / f"rank{rank}.txt").read_text()
        assert message.startswith("No space left on device while writing checkpoint step 4"), message
        assert message.endswith("the previous checkpoint is intact"), message
    assert checkpoint_find(out).name == "step-00000002"
    assert {p.name for p in (out / "checkpoints").iterdir()} - {"best"} == {"latest", "step-00000002"}  # no leftovers
    load_model(out)  # checksums and all


def memory_model_worker(info: distributed.Dist, corpus: Path, out: Path, parallel: str, overrides: dict) -> None:
    """Train the tiny model with `overrides` for 3 steps; rank 0 saves its whole weights."""
    trainer = Trainer(tiny_model().replace(**overrides),
                      fast_config(corpus, out, steps=3, batch_size=2, eval_every=3, parallel=parallel), info)
    trainer.fit()
    weights = full_weights(trainer.model) if parallel == "fsdp" else trainer.model.state_dict()
    if info.rank == 0:
        torch.save(weights, out.parent / "rank0.pt")


def train_under_ddp_and_fsdp(corpus: Path, tmp_path: Path, overrides: dict) -> dict:
    """Two DDP ranks and two FSDP ranks on the same batches: FSDP's final weights, after checking
    that they and the logged losses equal DDP's."""
    for parallel in ("ddp", "fsdp"):
        mp.spawn(as_rank, args=(free_port(), memory_model_worker, corpus, tmp_path / parallel / "run", parallel,
                                overrides), nprocs=2, join=True)
    ddp, sharded = (torch.load(tmp_path / p / "rank0.pt") for p in ("ddp", "fsdp"))
    assert_same_weights(sharded, ddp)
    losses = [[r["loss"] for r in train_records(tmp_path / p / "run")] for p in ("ddp", "fsdp")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], abs=TOL)
    return sharded


def test_fsdp_trains_a_knn_model_as_ddp_does(corpus, tmp_path):
    """XL memory and a kNN layer (written with its block's weights after the block's forward, which
    then stays gathered until its backward): two FSDP ranks end where two DDP ranks do."""
    sharded = train_under_ddp_and_fsdp(corpus, tmp_path, {"memory.xl.length": 32, "memory.knn.layers": [1],
                                                          "memory.knn.capacity": 128})
    initial = memlm.build(tiny_model().replace(**{"memory.knn.layers": [1]})).state_dict()
    assert not torch.equal(initial["blocks.1.attention.knn.gate"], sharded["blocks.1.attention.knn.gate"])


COMPRESSIVE = {"memory.xl.length": 16, "memory.compressive.rate": 4, "memory.compressive.length": 8,
               "memory.compressive.fn": "conv"}


def test_fsdp_trains_a_compressive_model_as_ddp_does(corpus, tmp_path):
    """Compressive memory (conv compressor, whose reconstruction loss runs each block's attention
    after the forward of the last block): two FSDP ranks end where two DDP ranks do, and the
    compressor has learned."""
    sharded = train_under_ddp_and_fsdp(corpus, tmp_path, COMPRESSIVE)
    torch.manual_seed(0)
    initial = memlm.build(tiny_model().replace(**COMPRESSIVE)).state_dict()
    assert any(name.startswith("compressors.") for name in sharded)
    assert all(not torch.equal(initial[name], sharded[name]) for name in sharded if name.startswith("compressors."))


def test_fsdp_refuses_mechanisms_that_run_block_weights_outside_the_block(corpus, tmp_path):
    config = fast_config(corpus, tmp_path / "run", parallel="fsdp")
    with pytest.raises(ValueError, match="^--parallel fsdp: memory.ntm.layers = \\[1\\]: slot memory reads and writes"):
        Trainer(tiny_model().replace(**{"memory.ntm.layers": [1]}), config, distributed.setup("cpu"))
    assert fsdp.gathered_blocks(tiny_model().replace(**COMPRESSIVE)) == set(range(tiny_model().layers))
    assert fsdp.gathered_blocks(tiny_model().replace(**{"memory.knn.layers": [1]})) == {1}
    assert fsdp.gathered_blocks(tiny_model()) == set()
    with pytest.raises(memlm.config.ConfigError, match="parallel"):
        train(tiny_model(), fast_config(corpus, tmp_path / "other", parallel="zero"))


@pytest.mark.parametrize("overrides", [{"memory.xl.length": 32, "dropout": 0.2},
                                       {"memory.knn.layers": [1], "memory.knn.capacity": 128}])
def test_activation_checkpointing_leaves_the_gradients_unchanged(overrides):
    """Recomputed blocks (dropout replayed from the saved RNG state) give the gradients of kept
    activations, with memory carried over segments; a kNN layer is not recomputed."""
    config = tiny_model().replace(**overrides)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = memlm.build(config)
        if checkpointed:
            fsdp.checkpoint_blocks(model, fsdp.uncheckpointable(config))
        state, data = model.init_state(2), torch.Generator().manual_seed(1)
        for _ in range(3):
            ids = torch.randint(0, 256, (2, SEQ), generator=data)
            out = model(ids, targets=ids, state=state)
            (out.loss + out.aux_loss).backward()
            state = out.state.detach()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert [getattr(b, "checkpointed", False) for b in model.blocks] == ([True, True] if "dropout" in overrides
                                                                       else [True, False])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def precision_worker(info: distributed.Dist, corpus: Path, out: Path, parallel: str) -> None:
    trainer = Trainer(tiny_model(), fast_config(corpus, out, steps=3, batch_size=2, eval_every=3, parallel=parallel,
                                                precision="bf16"), info)
    seen = []  # the dtype of the weights block 0's feed-forward computes with
    trainer.model.blocks[0].feedforward.register_forward_pre_hook(
        lambda module, args: seen.append(next(module.parameters()).dtype))
    trainer.fit()
    weights = full_weights(trainer.model) if parallel == "fsdp" else trainer.model.state_dict()
    if info.rank == 0:
        torch.save({"weights": weights, "seen": sorted({str(d) for d in seen}),
                    "masters": sorted({str(p.dtype) for p in trainer.model.parameters()})}, out.parent / "rank0.pt")


def test_a_bf16_fsdp_run_gathers_bf16_weights_keeps_fp32_masters_and_trains_as_ddp_does(corpus, tmp_path):
    """--precision bf16 under FSDP: blocks compute with bf16 weights (MixedPrecisionPolicy), the
    sharded weights stay fp32, and the run follows a bf16 DDP run (autocast) to bf16 rounding."""
    for parallel in ("ddp", "fsdp"):
        mp.spawn(as_rank, args=(free_port(), precision_worker, corpus, tmp_path / parallel / "run", parallel),
                 nprocs=2, join=True)
    ddp, sharded = (torch.load(tmp_path / p / "rank0.pt") for p in ("ddp", "fsdp"))
    assert sharded["seen"] == ["torch.bfloat16"] and ddp["seen"] == ["torch.float32"]
    assert sharded["masters"] == ddp["masters"] == ["torch.float32"]
    # AdamW moves a weight by about lr (3e-3) a step whatever its gradient's size, so a tiny gradient
    # whose sign bf16 rounding flips moves it the other way: a few weights differ by ~lr, the mean not
    assert sharded["weights"].keys() == ddp["weights"].keys()
    for name, p in ddp["weights"].items():
        difference = (sharded["weights"][name] - p).abs()
        assert difference.max() <= 3 * 3e-3 and difference.mean() <= 2e-4, name
    losses = [[r["loss"] for r in train_records(tmp_path / p / "run")] for p in ("ddp", "fsdp")]
    assert len(losses[0]) == 3 and losses[1][0] == losses[0][0] and losses[1] == pytest.approx(losses[0], abs=2e-3)
