"""Resuming: the steps after a crash and `resume` are exactly those of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from train_helpers import fast_config, tiny_model

from memlm.train import Trainer, checkpoint, train
from memlm.train.metrics import read


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """Make Trainer.train_step raise when it is about to take optimizer step `step` (1-based)."""
    original = Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            raise Crash
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def train_until_crash(monkeypatch, model, config, step: int) -> None:
    """Train with `config` until the trainer crashes just before optimizer step `step`."""
    with monkeypatch.context() as patch:
        crash_at(patch, step)
        with pytest.raises(Crash):
            train(model, config)


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read(run) if r["kind"] == "train"}


def test_resume_after_a_crash_matches_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    # dropout and forgetful masking draw from the torch RNG, so its state must be restored too
    model = tiny_model().replace(dropout=0.1, **{"attention.forgetful": 0.2})
    straight = tmp_path / "straight"
    train(model, fast_config(corpus, straight, steps=20, checkpoint_every=5))

    crashed = tmp_path / "crashed"
    train_until_crash(monkeypatch, model, fast_config(corpus, crashed, steps=20, checkpoint_every=5), 13)
    assert checkpoint.find(crashed).name == "step-00000010"
    assert max(losses(crashed)) == 12  # the crashed run logged steps 11 and 12 after its last checkpoint
    summary = train(model, fast_config(corpus, crashed, steps=20, checkpoint_every=5, resume=True))

    expected, resumed = losses(straight), losses(crashed)
    assert sorted(resumed) == list(range(1, 21))  # records after the checkpoint were replaced, not duplicated
    for step in range(11, 21):
        assert resumed[step] == expected[step], step
    a, _ = checkpoint.load_model(straight)
    b, _ = checkpoint.load_model(crashed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 4 * 32
    assert summary["test_bpb"] == read(straight)[-1]["bpb"]


def test_resume_takes_the_saved_configs_and_a_new_budget(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_model(), fast_config(corpus, run, steps=4, lr=1e-3))
    # a different model and lr on the command line are ignored; the budget is extended
    summary = train(tiny_model().replace(width=64), fast_config(corpus, run, steps=6, lr=5e-3, resume=True))
    assert summary["steps"] == 6
    saved = checkpoint.read_config(checkpoint.find(run))
    assert saved["model"]["width"] == 32 and saved["train"]["lr"] == 1e-3 and saved["train"]["steps"] == 6
