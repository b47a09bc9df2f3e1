"""The Trainer's public hooks: callbacks hear of the run with the values it logs, `warm_up` leaves
the run as it was, `evaluate` scores a split, and `model=` trains the module it is given."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from train_helpers import fast_config, tiny_model

import memlm
from memlm.model import LanguageModel
from memlm.train import Callback, Trainer, checkpoint, distributed, train
from memlm.train.metrics import read
from memlm.train.warmup import memory_warmup


class Recorder(Callback):
    """Every hook call, in order, with what it was given."""

    def __init__(self):
        self.calls = []

    def on_warmup_end(self, trainer, seconds):
        self.calls.append(("warmup_end", trainer.step, seconds))

    def on_evaluate(self, trainer, split, result):
        self.calls.append(("evaluate", trainer.step, split, result))

    def on_metrics(self, trainer, record):
        self.calls.append(("metrics", record["step"], record))

    def on_fit_end(self, trainer, summary):
        self.calls.append(("fit_end", trainer.step, summary))

    def of(self, hook):
        return [call for call in self.calls if call[0] == hook]


def trainer_of(corpus, out, model_config=None, callbacks=(), **changes) -> Trainer:
    config = fast_config(corpus, out, **changes)
    return Trainer(model_config or tiny_model(), config, distributed.setup("cpu"), callbacks=callbacks)


def test_callbacks_hear_every_evaluation_record_and_the_end_with_the_values_logged(corpus, tmp_path):
    recorder = Recorder()
    trainer = trainer_of(corpus, tmp_path / "run", callbacks=[recorder], steps=6, eval_every=3, checkpoint_every=3)
    assert trainer.warm_up(4) == 0.0  # CPU: nothing compiled
    summary = trainer.fit()

    assert recorder.of("warmup_end") == [("warmup_end", 0, 0.0)]
    evaluations = [(step, split) for _, step, split, _ in recorder.of("evaluate")]
    assert evaluations == [(0, "validation"), (3, "validation"), (6, "validation"), (6, "test")]
    # on_metrics gets each record exactly as metrics.jsonl holds it
    records = [record for _, _, record in recorder.of("metrics")]
    assert records == read(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] != "train"] == \
        [("eval", 0), ("eval", 3), ("eval", 6), ("test", 6)]
    for (_, _, _, result), record in zip(recorder.of("evaluate"), [r for r in records if r["kind"] != "train"]):
        assert result["bpb"] == record["bpb"] and result["tokens"] == record["scored_tokens"]
    (_, step, ended), = recorder.of("fit_end")
    assert ended is summary and step == summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert recorder.calls[-1][0] == "fit_end"

    # the last validation evaluation scored these weights (test_weights last): Trainer.evaluate agrees
    last_validation = recorder.of("evaluate")[2][3]
    assert trainer.evaluate("validation", trainer.eval_tokens)["bpb"] == last_validation["bpb"]
    assert trainer.eval_tokens == 1 * 4 * 32
    test = trainer.evaluate("test")
    assert test["bpb"] == summary["test_bpb"] == recorder.of("evaluate")[3][3]["bpb"]
    assert test["tokens"] == summary["test_tokens"] > trainer.eval_tokens  # the whole split


@pytest.mark.parametrize("preset", ["seed-tiny", "seed-compressive-tiny"])
def test_warm_up_leaves_the_loader_and_the_rngs_as_they_were(corpus, tmp_path, preset):
    model_config = memlm.config.resolve(preset, layers=2, width=32, seq_len=32, **{"attention.heads": 2})
    plain = trainer_of(corpus, tmp_path / "plain", model_config)
    recorder = Recorder()
    warmed = trainer_of(corpus, tmp_path / "warmed", model_config, callbacks=[recorder])
    warmed.config = dataclasses.replace(warmed.config, compile=True)  # run the passes (on the uncompiled model)
    passes = []
    model = warmed.train_model
    warmed.train_model = lambda *args, **kwargs: passes.append(1) or model(*args, **kwargs)
    loader, rng = warmed.loader.state_dict(), torch.get_rng_state()
    seconds = warmed.warm_up(2)

    assert seconds > 0 and recorder.calls == [("warmup_end", 0, seconds)]  # no evaluation of the run
    # a model with memory gets the passes its memories take to fill (compressed memory fills last)
    assert len(passes) == (memory_warmup(model_config) if model_config.stateful else 2)
    assert warmed.loader.state_dict() == loader and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in warmed.model.parameters()) and warmed.step == 0
    for want, got in zip(plain.loader.next_batch(), warmed.loader.next_batch(), strict=True):
        assert torch.equal(want, got)  # the next batch is the one a run without warm-up reads


def test_model_trains_the_module_it_is_given(corpus, tmp_path):
    class Marked(LanguageModel):
        pass

    torch.manual_seed(7)
    model = Marked(tiny_model())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "run"
    summary = train(None, fast_config(corpus, out, steps=4), model=model)  # its config is model.config

    assert summary["steps"] == 4
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())  # this module was trained
    saved, _ = checkpoint.load_model(out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.state_dict().items())
    assert saved.config == model.config
    with pytest.raises(ValueError, match="a model config, a model, or both"):
        Trainer(None, fast_config(corpus, tmp_path / "none"), distributed.setup("cpu"))
