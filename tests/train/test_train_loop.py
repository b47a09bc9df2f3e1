"""The training loop: it learns, it writes a complete run directory, its budgets and progress."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch
from train_helpers import fast_config, tiny_model, write_corpus

from memlm.config import ConfigError
from memlm.data import site_packages
from memlm.train.config import launch_command
from memlm.train import CheckpointError, Trainer, checkpoint, train
from memlm.train import distributed
from memlm.train.metrics import read


def test_training_lowers_the_loss_and_fills_the_run_directory(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_model(), fast_config(corpus, out, steps=30, eval_every=10, checkpoint_every=10),
                    preset="seed-tiny")
    records = read(out)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[0]["bpb"] == pytest.approx(math.log2(257), abs=0.1)  # untrained: about uniform over 257 ids
    assert evals[-1]["bpb"] < evals[0]["bpb"] - 1.5
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0
    assert all(r["bpb"] == pytest.approx(r["loss"] / math.log(2)) for r in train_records)
    assert train_records[-1]["tokens"] == 30 * 4 * 32

    assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 32
    assert records[-1]["kind"] == "test" and records[-1]["bpb"] == summary["test_bpb"]
    assert summary["test_bpb"] < evals[0]["bpb"] - 1.5
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["width"] == 32 and config["train"]["steps"] == 30 and config["preset"] == "seed-tiny"
    assert config["data"]["splits"]["train"]["documents"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.txt").read_text().count("=== step") == 4  # one per evaluation
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").resolve().name == "step-00000030"


def test_token_budget_rounds_up_to_whole_steps(corpus, tmp_path):
    tokens_per_step = 4 * 32
    summary = train(tiny_model(), fast_config(corpus, tmp_path / "run", steps=None, tokens=3 * tokens_per_step + 1))
    assert summary["steps"] == 4 and summary["tokens"] == 4 * tokens_per_step


def test_gradient_accumulation_counts_tokens_and_averages_the_loss(corpus, tmp_path):
    trainer = Trainer(tiny_model(), fast_config(corpus, tmp_path / "run", grad_accum=3), distributed.setup("cpu"))
    assert trainer.tokens_per_step == 3 * 4 * 32
    expected = []
    probe = Trainer(tiny_model(), fast_config(corpus, tmp_path / "probe", grad_accum=3), distributed.setup("cpu"))
    with torch.no_grad():
        for _ in range(3):
            x, y = probe.loader.next_batch()
            expected.append(probe.model(x, targets=y).loss)
    loss, grad_norm, bad = trainer.train_step()
    assert bad.item() == 0.0
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    assert grad_norm.item() > 0


def test_wall_clock_budget_schedules_by_elapsed_time(corpus, tmp_path):
    trainer = Trainer(tiny_model(), fast_config(corpus, tmp_path / "run", steps=None, minutes=1.0, warmup_steps=2),
                      distributed.setup("cpu"))
    assert trainer.total_steps is None
    assert trainer.progress() == 0.0  # warming up
    trainer.decay_start, trainer.elapsed = 6.0, 33.0
    assert trainer.progress() == pytest.approx((33 - 6) / (60 - 6))
    assert not trainer.done()
    # evaluations by default at every tenth of the budget (6 seconds), counted from the last one
    trainer.origin = time.perf_counter() - 31.0  # the clock reads 31 s of training
    assert trainer._next_mark() == 36.0
    trainer.origin = time.perf_counter() - 35.5  # an evaluation that ended just before a mark
    assert trainer._next_mark() == pytest.approx(38.5, abs=0.05)  # waits half an interval, not a step
    trainer.next_mark, trainer.elapsed = 36.0, 35.9
    assert not trainer._due(None)
    trainer.elapsed = 36.1
    assert trainer._due(None)
    trainer.elapsed = 60.0
    assert trainer.done() and trainer.progress() == 1.0


def test_default_cadence_is_ten_evaluations_and_checkpoints(corpus, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(Trainer, "save", lambda self: saved.append(self.step))
    train(tiny_model(), fast_config(corpus, tmp_path / "run", steps=20, eval_every=None, checkpoint_every=None))
    assert [r["step"] for r in read(tmp_path / "run") if r["kind"] == "eval"] == list(range(0, 21, 2))
    assert saved == list(range(2, 21, 2))


def test_a_run_directory_is_not_overwritten_without_resume(corpus, tmp_path):
    train(tiny_model(), fast_config(corpus, tmp_path / "run", steps=2))
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny_model(), fast_config(corpus, tmp_path / "run", steps=2))
    with pytest.raises(CheckpointError, match="no such run"):
        train(tiny_model(), fast_config(corpus, tmp_path / "other", steps=2, resume=True))


def fake_validation(monkeypatch, scores: list[float]) -> None:
    """Validation bpb replaced by `scores` in turn (the test split is still scored for real), so that
    which evaluation is best is known in advance."""
    real, queue = Trainer.evaluate, list(scores)

    def evaluate(self, split="validation", max_tokens=None):
        result = real(self, split, max_tokens)
        return {**result, "bpb": queue.pop(0)} if split == "validation" else result

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def test_bpb(run_dir, pointer: str) -> float:
    """Test bpb of a run's checkpoint, computed apart from the trainer."""
    from memlm.data import prepare
    from memlm.eval import evaluate
    model, config = checkpoint.load_model(checkpoint.find(run_dir, pointer))
    split = prepare(config["train"]["data"], None, tuple(config["train"]["fractions"])).split("test")
    return evaluate(model, split, 4, 32)["bpb"]


test_bpb.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("weights", ["best", "last"])
def test_test_weights_score_the_best_validation_or_the_last_step(corpus, tmp_path, monkeypatch, weights):
    fake_validation(monkeypatch, [9.0, 5.0, 1.0, 4.0, 6.0])  # evaluations at steps 0, 2, 4, 6, 8: best at 4
    out = tmp_path / "run"
    summary = train(tiny_model(), fast_config(corpus, out, steps=8, eval_every=2, checkpoint_every=2,
                                              test_weights=weights))
    assert checkpoint.find(out, "best").name == "step-00000004"
    expected = test_bpb(out, weights if weights == "best" else "latest")
    assert summary["test_bpb"] == pytest.approx(expected, rel=1e-6)
    assert summary["test_bpb"] != pytest.approx(test_bpb(out, "latest" if weights == "best" else "best"), rel=1e-4)
    assert summary["test_step"] == (4 if weights == "best" else 8) and summary["test_weights"] == weights
    assert read(out)[-1]["weights_step"] == summary["test_step"]


def test_the_tested_best_weights_are_kept_when_no_checkpoint_was_written_at_their_step(corpus, tmp_path,
                                                                                       monkeypatch):
    """A race checkpoints only after its budget; checkpoints/best must still hold the weights
    the test scored (for memlm eval / memorize), while latest stays the last step's."""
    fake_validation(monkeypatch, [9.0, 5.0, 1.0, 4.0, 6.0])  # best at step 4, no checkpoint there
    out = tmp_path / "run"
    summary = train(tiny_model(), fast_config(corpus, out, steps=8, eval_every=2, checkpoint_every=1000,
                                              test_weights="best"))
    assert summary["test_step"] == 4
    assert checkpoint.find(out, "best").name == "step-00000004"
    assert checkpoint.find(out, "latest").name == "step-00000008"
    assert checkpoint.load_trainer_state(checkpoint.find(out, "best"))["step"] == 4
    assert summary["test_bpb"] == pytest.approx(test_bpb(out, "best"), rel=1e-6)
    assert summary["test_bpb"] != pytest.approx(test_bpb(out, "latest"), rel=1e-4)


def test_a_resumed_run_tests_the_best_checkpoint_of_before(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fake_validation(monkeypatch, [9.0, 5.0, 1.0, 4.0, 6.0, 7.0, 8.0])
    train(tiny_model(), fast_config(corpus, out, steps=8, eval_every=2, checkpoint_every=2, test_weights="best"))
    summary = train(tiny_model(), fast_config(corpus, out, steps=12, eval_every=2, checkpoint_every=2,
                                              test_weights="best", resume=True))  # evaluates at 10, 12: worse
    assert summary["test_step"] == 4
    assert summary["test_bpb"] == pytest.approx(test_bpb(out, "best"), rel=1e-6)


def test_test_weights_must_be_best_or_last(corpus, tmp_path):
    with pytest.raises(ConfigError, match="test_weights"):
        fast_config(corpus, tmp_path / "run", test_weights="first").validate()


def test_no_sample_bytes_runs_no_sampling(corpus, tmp_path, monkeypatch):
    """sample_bytes=0 (the race's default) samples nothing: the sampler is never called, so a
    budgeted run spends no clock on it (or on compiling its batch-of-one shapes)."""
    from memlm.train import trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("sample_text called with sample_bytes=0")

    monkeypatch.setattr(trainer_module, "sample_text", refuse)
    out = tmp_path / "run"
    summary = train(tiny_model(), fast_config(corpus, out, steps=4, eval_every=2, sample_bytes=0))
    assert summary["sample"] == "" and not (out / "samples.txt").exists()
    assert [r["step"] for r in read(out) if r["kind"] == "eval"] == [0, 2, 4]


def test_run_config_keeps_the_corpus_inventory(tmp_path, monkeypatch):
    """A site-packages run's config.json says what it trained on: roots, files, distributions."""
    stdlib, site = write_corpus(tmp_path / "lib" / "python3.11"), tmp_path / "venv" / "site-packages"
    meta = site / "fakepkg-1.2.3.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.2.3\n")
    monkeypatch.setattr(site_packages, "site_packages_roots", lambda: [("stdlib", stdlib), ("purelib", site)])
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train(tiny_model(), fast_config(stdlib, out, data="site-packages-text", steps=2, eval_every=2, checkpoint_every=2))
    (inventory,) = json.loads((out / "config.json").read_text())["data"]["inventory"]
    assert inventory["files"] == 40 and inventory["roots"][0] == {"role": "stdlib", "path": str(stdlib)}
    assert inventory["distributions"] == [{"name": "fakepkg", "version": "1.2.3"}]
    assert json.loads((out / "config.json").read_text())["command"] == launch_command()  # the process's own
    monkeypatch.setattr(sys, "argv", ["/usr/bin/memlm", "train", "--data", "two words"])
    assert launch_command() == "memlm train --data 'two words'"  # what config.json records as "command"
