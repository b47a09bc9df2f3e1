"""Bad input gets a clear error instead of a silent default, a traceback or a wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

import memlm
from memlm.cli import main
from memlm.config import ConfigError
from memlm.data import sources
from memlm.train import TrainConfig


@pytest.mark.parametrize("field", ["lr", "batch_size"])
def test_zero_learning_rate_or_batch_is_an_error_not_the_default(field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: 0}).resolve("cpu")
    assert TrainConfig().resolve("cpu").lr > 0 and TrainConfig().resolve("cpu").batch_size > 0


def test_empty_input_and_a_state_of_another_depth_are_refused():
    model = memlm.build("seed-xl-tiny", layers=2)
    with pytest.raises(ValueError, match=r"no tokens \(shape \(B, 0\)\)"):
        model(torch.zeros(2, 0, dtype=torch.long))
    deeper = memlm.build("seed-xl-tiny", layers=4)
    with pytest.raises(ValueError, match="state was made for a model of 2 layers, this one has 4"):
        deeper(torch.zeros(1, 4, dtype=torch.long), state=model.init_state(1))


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_generation_refuses_a_temperature_that_is_not_a_finite_non_negative_number(temperature):
    model = memlm.build("seed-tiny", layers=1)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        memlm.generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, temperature=temperature)


def test_a_data_directory_whose_name_has_a_comma_is_one_source(tmp_path):
    odd = tmp_path / "a,b"
    odd.mkdir()
    (odd / "x.txt").write_text("hello")
    (tmp_path / "c.txt").write_text("world")
    assert len(sources.parse_spec(str(odd))) == 1
    (tmp_path / "d.txt").write_text("again")
    assert len(sources.parse_spec(f"{tmp_path / 'd.txt'},{tmp_path / 'c.txt'}")) == 2  # a list still splits


def test_eval_refuses_a_negative_token_count(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--max-tokens", "-5"]) == 2
    assert "--max-tokens must be positive, got -5" in capsys.readouterr().err


def test_a_corpus_without_a_test_split_fails_before_training(tmp_path, monkeypatch):
    from memlm.data import DataError
    from memlm.train import train

    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus").mkdir()
    for i in range(20):
        (tmp_path / "corpus" / f"{i}.txt").write_text("some text " * 50)
    config = TrainConfig(data=str(tmp_path / "corpus"), fractions=(0.5, 0.5, 0.0), out=str(tmp_path / "run"),
                         steps=5, device="cpu")
    with pytest.raises(DataError, match="split 'test' has no documents"):
        train(memlm.config.resolve("seed-tiny", layers=1), config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
