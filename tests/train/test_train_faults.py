"""Faults in training: non-finite losses, the best checkpoint, interrupted first saves, a checkpoint
of another model put in place, two trainings in one run directory."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from train_helpers import fast_config, tiny_model

import memlm
from memlm.cli import main
from memlm.model import LanguageModel
from memlm.train import CheckpointError, TrainingError, checkpoint, distributed, train
from memlm.train.metrics import read


def poisoned(bad_steps: set[int] | None = None, from_step: int | None = None):
    """A LanguageModel class whose training loss is NaN on the given optimizer steps (1-based), or
    on every step from `from_step` on."""

    class Poisoned(LanguageModel):
        step = 0

        def forward(self, input_ids, targets=None, state=None):
            out = super().forward(input_ids, targets=targets, state=state)
            if self.training and targets is not None:
                Poisoned.step += 1
                if Poisoned.step in (bad_steps or ()) or (from_step is not None and Poisoned.step >= from_step):
                    out.loss = out.loss * math.nan
            return out

    return Poisoned


def test_non_finite_steps_are_skipped_counted_and_leave_the_weights_finite(corpus, tmp_path):
    run = tmp_path / "run"
    summary = train(None, fast_config(corpus, run, steps=8, max_nonfinite_steps=3),
                    model=poisoned({3, 4})(tiny_model()))
    assert summary["steps"] == 8 and math.isfinite(summary["test_bpb"])
    trains = [r for r in read(run) if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in trains] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in trains if r["step"] not in (3, 4))
    state = checkpoint.load_trainer_state(checkpoint.find(run))
    assert state["skipped_steps"] == 2
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6.0}  # 8 steps, 2 of them made no update
    model, _ = checkpoint.load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_run_that_stays_non_finite_stops_naming_the_last_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    config = fast_config(corpus, run, steps=20, max_nonfinite_steps=3, checkpoint_every=2, eval_every=10)
    with pytest.raises(TrainingError, match=r"stopped at step 6: .* 3 steps in a row .*step-00000004"):
        train(None, config, model=poisoned(from_step=4)(tiny_model()))
    assert os.readlink(run / "checkpoints" / "latest") == "step-00000004"


def test_the_cli_reports_a_stopped_run_in_one_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memlm.train.trainer, "LanguageModel", poisoned(from_step=1))
    rc = main(["train", "--preset", "seed-tiny", "--data", str(corpus), "--out", str(tmp_path / "run"),
               "--steps", "10", "--max_nonfinite_steps", "2", "--batch_size", "2", "--device", "cpu",
               "--model.layers", "1", "--model.width", "32", "--model.seq_len", "16", "--eval_every", "10",
               "--fractions", "0.8", "0.1", "0.1", "--sample_bytes", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("memlm train: error: stopped at step 2:") and "no checkpoint was written" in err[-1]


def test_eval_refuses_to_score_non_finite_weights(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_model(), fast_config(corpus, run, steps=2, eval_every=2, checkpoint_every=2))
    model, _ = checkpoint.load_model(run)
    with torch.no_grad():
        model.blocks[0].attention.qkv.weight.fill_(math.nan)
    target = checkpoint.find(run)  # a checkpoint whose weights are NaN, its manifest consistent
    checkpoint.save(run / "checkpoints", 3, model, {"step": 3}, checkpoint.read_config(target))
    rc = main(["eval", str(run), "--device", "cpu", "--max-tokens", "64"])
    assert rc == 2
    assert "test bpb is nan, not a score" in capsys.readouterr().err


def test_best_points_at_the_checkpoint_of_the_evaluated_step(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_model(), fast_config(corpus, run, steps=8, eval_every=4, checkpoint_every=2))
    best = os.readlink(run / "checkpoints" / "best")
    evals = {r["step"]: r["bpb"] for r in read(run) if r["kind"] == "eval"}
    assert set(evals) == {0, 4, 8}
    best_step = min((step for step in evals if step > 0), key=evals.get)  # step 0 has no checkpoint
    if evals[0] < evals[best_step]:
        pytest.skip("the untrained model validated best: no checkpoint of it exists")
    assert best == f"step-{best_step:08d}"
    assert checkpoint.load_trainer_state(run / "checkpoints" / "best")["best_evaluated_step"] == best_step


def test_resume_of_a_run_with_no_complete_checkpoint_starts_it_again(corpus, tmp_path):
    """A kill inside the first save leaves config.json and a temporary directory only."""
    run = tmp_path / "run"
    config = fast_config(corpus, run, steps=4, eval_every=4, checkpoint_every=4)
    train(tiny_model(), config)
    for path in (run / "checkpoints").iterdir():  # as if killed before the first rename completed
        os.rename(path, run / "checkpoints" / f".tmp-{path.name}-dead") if not path.is_symlink() else path.unlink()
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(tiny_model(), config)
    summary = train(tiny_model(), fast_config(corpus, run, steps=4, eval_every=4, checkpoint_every=4, resume=True))
    assert summary["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "latest", "step-00000004"]
    assert [r["step"] for r in read(run) if r["kind"] == "eval"] == [0, 4]  # one run's records, not two
    with pytest.raises(CheckpointError, match="no such run directory"):
        train(tiny_model(), fast_config(corpus, tmp_path / "missing", steps=4, resume=True))


def test_resume_refuses_a_checkpoint_of_another_model_and_keeps_the_metrics(corpus, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    train(tiny_model(), fast_config(corpus, run, steps=4, eval_every=2, checkpoint_every=2))
    wider = memlm.config.resolve("seed-tiny", layers=2, width=48, seq_len=32, **{"attention.heads": 2})
    train(wider, fast_config(corpus, other, steps=2, eval_every=2, checkpoint_every=2))
    metrics = (run / "metrics.jsonl").read_text()
    target = os.readlink(run / "checkpoints" / "latest")
    import shutil
    shutil.rmtree(run / "checkpoints" / target)
    shutil.copytree(checkpoint.find(other), run / "checkpoints" / target)  # another run's checkpoint put in place
    with pytest.raises(CheckpointError, match=r"holds another model than the run .* \(differs in width\)"):
        train(tiny_model(), fast_config(corpus, run, steps=6, resume=True))
    assert (run / "metrics.jsonl").read_text() == metrics


def test_two_trainings_cannot_share_a_run_directory(corpus, tmp_path, capsys):
    from memlm.train.lock import RunLock

    run = tmp_path / "run"
    holder = RunLock(run).acquire()  # another training, as far as the lock can tell
    try:
        rc = main(["train", "--preset", "seed-tiny", "--data", str(corpus), "--out", str(run), "--steps", "2",
                   "--device", "cpu"])
        assert rc == 2
        assert f"is in use by another training (PID {os.getpid()})" in capsys.readouterr().err
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.release()
    (run / ".lock").write_text("999999999\n")  # the file a dead holder leaves: no lock is held on it
    summary = train(tiny_model(), fast_config(corpus, run, steps=2, eval_every=2, checkpoint_every=2))
    assert summary["steps"] == 2


def corrupt(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        flipped = bytearray(data)
        for i in range(0, len(flipped), max(1, len(flipped) // 50)):
            flipped[i] ^= 0x5A
        path.write_bytes(bytes(flipped))
    else:  # random bytes of the same size
        path.write_bytes(os.urandom(len(data)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from train_helpers import write_corpus

    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMLM_CACHE", str(root / "cache"))
        corpus = write_corpus(root / "corpus")
        run = root / "run"
        train(tiny_model(), fast_config(corpus, run, steps=2, eval_every=2, checkpoint_every=2))
    return root / "cache", run


@pytest.mark.parametrize("how", ["truncate", "flip", "random"])
@pytest.mark.parametrize("name", [checkpoint.WEIGHTS, checkpoint.TRAINER, checkpoint.CONFIG, checkpoint.MANIFEST])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(finished_run, tmp_path, name, how, capsys, monkeypatch):
    import shutil

    cache, run = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    target = checkpoint.find(copy)
    corrupt(target / name, how)
    monkeypatch.setenv("MEMLM_CACHE", str(cache))
    evaluate = ["eval", str(copy), "--device", "cpu", "--max-tokens", "64"]
    resume = ["train", "--out", str(copy), "--resume", "--steps", "3", "--device", "cpu"]
    for argv in ([evaluate] if name != checkpoint.TRAINER else []) + [resume]:  # eval reads no trainer state
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (argv[0], err)
        assert err[-1].startswith(f"memlm {argv[0]}: error:") and str(target) in err[-1], err[-1]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_ends_in_one_line_and_leaves_the_previous_checkpoint(corpus, small_disk, capsys, monkeypatch):
    run = small_disk / "run"
    train(tiny_model(), fast_config(corpus, run, steps=2, eval_every=2, checkpoint_every=2, sample_bytes=0))
    first = checkpoint.find(run)
    free = os.statvfs(small_disk)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave ~40 KB: enough for metrics, not for a checkpoint
        f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - 40_000))
    monkeypatch.setattr(memlm.train.trainer, "plot_curves", lambda *a, **k: None)
    rc = main(["train", "--out", str(run), "--resume", "--steps", "4", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "No space left on device while writing checkpoint step 4" in err[-1], err[-1]
    assert "the previous checkpoint is intact" in err[-1]
    assert checkpoint.find(run) == first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "latest", first.name]
    model, _ = checkpoint.load_model(run)  # still loads, checksums and all
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_read_only_output_directory_is_one_line(corpus, small_disk, capsys):
    import subprocess

    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode == 0
    rc = main(["train", "--data", str(corpus), "--out", str(small_disk / "run"), "--steps", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("memlm train: error: Read-only file system") and str(small_disk / "run") in err[0]


CLI_RUN = ["--preset", "seed-tiny", "--model.layers", "2", "--model.width", "32", "--model.seq_len", "32",
           "--model.attention.heads", "2", "--steps", "24", "--batch_size", "4", "--lr", "3e-3", "--warmup_steps", "2",
           "--checkpoint_every", "1", "--eval_every", "12", "--eval_batches", "1", "--log_every", "1",
           "--sample_bytes", "0", "--fractions", "0.8", "0.1", "0.1", "--device", "cpu"]


def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(corpus, tmp_path):
    """A subprocess trainer (a checkpoint every step, so kills land inside saves too) is killed
    with SIGKILL twice and resumed; its weights and losses equal those of a run never killed."""
    import random
    import signal
    import subprocess
    import sys
    import time

    def command(out, *extra):
        return [sys.executable, "-m", "memlm.cli", "train", "--data", str(corpus), "--out", str(out), *CLI_RUN, *extra]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), env=env, check=True, capture_output=True)
    rng = random.Random(0)
    for records in (4, 14):  # kill once the run has logged this many steps, a random moment later
        process = subprocess.Popen(command(killed, *(["--resume"] if killed.exists() else [])), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len([r for r in read(killed) if r["kind"] == "train"]) < records and process.poll() is None:
            assert time.time() < deadline, "the trainer made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "the run ended before it was killed: kill sooner"
    subprocess.run(command(killed, "--resume"), env=env, check=True, capture_output=True)

    a, _ = checkpoint.load_model(straight)
    b, _ = checkpoint.load_model(killed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    steps = {r["step"]: r["loss"] for r in read(killed) if r["kind"] == "train"}
    assert steps == {r["step"]: r["loss"] for r in read(straight) if r["kind"] == "train"}
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("how", ["truncate", "flip", "random"])
@pytest.mark.parametrize("name", [checkpoint.CONFIG, "metrics.jsonl"])
def test_damaged_run_records_give_one_line_or_are_dropped(finished_run, tmp_path, name, how, capsys, monkeypatch):
    """The run's own config.json is checked against the checkpoint's (one line if unreadable);
    metrics.jsonl records that no longer parse are dropped, and the run resumes."""
    import shutil

    cache, run = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    corrupt(copy / name, how)
    monkeypatch.setenv("MEMLM_CACHE", str(cache))
    rc = main(["train", "--out", str(copy), "--resume", "--steps", "3", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    if name == checkpoint.CONFIG:
        assert rc == 2 and err[-1].startswith("memlm train: error:") and str(copy / name) in err[-1], err[-1]
    else:
        assert rc == 0
        assert [r["step"] for r in read(copy) if r["kind"] == "train"][-1] == 3


def test_metrics_records_damaged_into_other_json_are_dropped(tmp_path):
    """A damaged metrics line may still parse (a bare number, a list, a dict without its step):
    reading and truncating keep only the whole records."""
    from memlm.train.metrics import truncate
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "eval", "step": 2, "bpb": 1.5},
            {"kind": "train", "step": 3, "loss": 1.0}]
    lines = [json.dumps(good[0]), "5", "[1, 2]", '{"kind": "train"}', '{"step": "x", "kind": "eval"}',
             json.dumps(good[1]), json.dumps(good[2])]
    path.write_text("\n".join(lines) + "\n")
    assert read(path) == good
    truncate(path, 2)
    assert read(path) == good[:2]


def test_flags_read_a_step_late_still_count_every_skipped_step(corpus, tmp_path):
    """Records every 4 steps: the flags of steps 3 and 4 are read after later steps were queued,
    yet both are counted, made no update and left the loss of the finite steps alone."""
    run = tmp_path / "run"
    summary = train(None, fast_config(corpus, run, steps=8, log_every=4, eval_every=8, checkpoint_every=None),
                    model=poisoned({3, 4})(tiny_model()))
    assert summary["steps"] == 8
    trains = [r for r in read(run) if r["kind"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in trains] == [(4, 2), (8, 2)]
    assert all(math.isfinite(r["loss"]) for r in trains)  # steps 1-2 and 5-8: the NaNs left out
    state = checkpoint.load_trainer_state(checkpoint.find(run))
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {6.0}


def test_a_late_flag_still_stops_the_run_at_the_step_that_failed(corpus, tmp_path):
    run = tmp_path / "run"
    config = fast_config(corpus, run, steps=20, max_nonfinite_steps=3, log_every=10, checkpoint_every=3,
                         eval_every=10)
    with pytest.raises(TrainingError, match=r"stopped at step 6: .* 3 steps in a row .*step-00000003"):
        train(None, config, model=poisoned(from_step=4)(tiny_model()))


@pytest.mark.parametrize("memory", [{}, {"memory.xl.length": 32},
                                    {"memory.knn.layers": [1], "memory.knn.capacity": 64, "memory.knn.k": 4},
                                    {"memory.xl.length": 32, "memory.adaptive_span.enabled": True}],
                         ids=["none", "xl", "knn", "span"])
def test_a_training_step_reads_nothing_from_the_device(corpus, tmp_path, monkeypatch, memory):
    """A host read in the step stalls a GPU every step (BENCHMARKS.md, where a memory row's step
    goes): the step, a non-finite one included, must not call any."""
    config = tiny_model().replace(**memory)
    trainer = memlm.train.Trainer(config, fast_config(corpus, tmp_path / "run"), distributed.setup("cpu"),
                                  model=poisoned({2})(config))
    before = [p.detach().clone() for p in trainer.model.parameters()]

    def read(*args, **kwargs):
        raise AssertionError("the training step read a tensor on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
            patch.setattr(torch.Tensor, name, read)
        flags = [trainer.train_step()[2] for _ in range(3)]
    assert [float(f) for f in flags] == [0.0, 1.0, 0.0]
    assert trainer.optimizer.state[trainer.model.embed.weight]["step"].item() == 2  # the NaN step made none
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer.close()


def test_a_checkpoint_of_an_unfused_optimizer_resumes(corpus, tmp_path, monkeypatch):
    """Runs before the Trainer fused AdamW on the CPU saved `fused: False`; loading it must not
    bring back a kernel that refuses the non-finite flag."""
    run = tmp_path / "run"
    unfused = torch.optim.AdamW.state_dict

    def state_dict(self):
        saved = unfused(self)
        for group in saved["param_groups"]:
            group["fused"] = False
        return saved

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "state_dict", state_dict)
        train(tiny_model(), fast_config(corpus, run, steps=4, checkpoint_every=2))
    saved = checkpoint.load_trainer_state(checkpoint.find(run))
    assert saved["optimizer"]["param_groups"][0]["fused"] is False
    summary = train(tiny_model(), fast_config(corpus, run, steps=8, checkpoint_every=2, resume=True))
    assert summary["steps"] == 8 and math.isfinite(summary["test_bpb"])
