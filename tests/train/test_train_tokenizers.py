"""Runs with a non-byte tokenizer: the model's vocabulary follows it, the run and its checkpoints keep
its tokenizer.json, and a tokenizer that does not match a checkpoint's model is a clear error."""

from __future__ import annotations

import json

import pytest
from train_helpers import fast_config, tiny_model

from memlm.config import ConfigError
from memlm.data import DataError
from memlm.data.tokenizers import TOKENIZER_FILE
from memlm.model import LanguageModel
from memlm.train import CheckpointError, Trainer, checkpoint, distributed, load_tokenizer, train

pytest.importorskip("tokenizers", reason="the tok extra (tokenizers) is not installed")


@pytest.fixture
def bpe_run(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    summary = train(tiny_model(), fast_config(corpus, out, steps=2, eval_every=2, checkpoint_every=2,
                                              tokenizer="bpe:300"))
    return out, summary


def test_vocab_size_follows_the_tokenizer(bpe_run):
    out, summary = bpe_run
    saved = json.loads((out / "config.json").read_text())
    tokenizer = load_tokenizer(out)
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size != 257
    assert saved["model"]["vocab_size"] == tokenizer.vocab_size == saved["data"]["tokenizer"]["vocab_size"]
    assert saved["train"]["tokenizer"] == "bpe:300"
    model, _ = checkpoint.load_model(out)
    assert model.embed.weight.shape[0] == tokenizer.vocab_size  # the embedding was built for it
    found = checkpoint.find(out)
    assert (found / TOKENIZER_FILE).read_text() == (out / TOKENIZER_FILE).read_text() == tokenizer.json
    assert TOKENIZER_FILE in json.loads((found / checkpoint.MANIFEST).read_text())["files"]
    assert summary["test_bpb"] > 0


def test_a_checkpoint_of_another_vocabulary_is_a_clear_error(bpe_run):
    out, _ = bpe_run
    saved = checkpoint.read_config(checkpoint.find(out))
    other = {**saved, "model": {**saved["model"], "vocab_size": 257}}
    with pytest.raises(CheckpointError, match=r"has \d+ tokens but the model of .* has vocab_size 257"):
        load_tokenizer(out, other)
    (checkpoint.find(out) / TOKENIZER_FILE).unlink()  # the run directory's copy still serves
    assert load_tokenizer(out).vocab_size == saved["model"]["vocab_size"]
    (out / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is neither there nor in its run directory"):
        load_tokenizer(out)


def test_a_given_model_of_another_vocabulary_is_refused(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    config = fast_config(corpus, tmp_path / "run", steps=1, tokenizer="bpe:300")
    with pytest.raises(DataError, match="vocab_size 257"):
        Trainer(None, config, distributed.setup("cpu"), model=LanguageModel(tiny_model()))


def test_recall_task_needs_the_byte_tokenizer(corpus, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        fast_config(corpus, tmp_path / "run", task="recall", tokenizer="bpe:300").validate()
    with pytest.raises(ConfigError, match="tokenizer"):
        fast_config(corpus, tmp_path / "run", tokenizer="bpe:3").validate()


def test_a_resumed_run_keeps_its_tokenizer(bpe_run, corpus, tmp_path):
    out, _ = bpe_run
    before = load_tokenizer(out)
    for trained in (tmp_path / "cache" / "tokenizers").iterdir():
        trained.unlink()  # a bpe:300 spec would have to be trained again
    summary = train(tiny_model(), fast_config(corpus, out, steps=3, eval_every=3, checkpoint_every=3,
                                              tokenizer="bpe:300", resume=True))
    assert summary["steps"] == 3 and load_tokenizer(out).sha256 == before.sha256
    assert not list((tmp_path / "cache" / "tokenizers").iterdir())  # read from the run, not trained
