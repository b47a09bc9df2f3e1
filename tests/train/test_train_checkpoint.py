"""Checkpoints: tied weights stored once, atomic saves, finding checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from train_helpers import tiny_model

import memlm
from memlm.model import LanguageModel
from memlm.train import CheckpointError, checkpoint

CONFIG = {"model": tiny_model().to_dict(), "train": {}, "data": {}}


def make_model(seed: int) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(tiny_model())


def assert_same_weights(a: LanguageModel, b: LanguageModel) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_round_trip_stores_the_tied_head_once(tmp_path):
    model = make_model(0)
    path = checkpoint.save(tmp_path, 3, model, {"step": 3}, CONFIG)
    stored = safetensors.torch.load_file(path / checkpoint.WEIGHTS)
    assert len(stored) == len({id(p) for p in model.parameters()}) == len(model.state_dict()) - 1
    loaded, config = checkpoint.load_model(tmp_path)
    assert config == CONFIG
    assert_same_weights(model, loaded)
    assert loaded.head.weight is loaded.embed.weight  # still tied after loading
    assert checkpoint.load_trainer_state(path) == {"step": 3}


def test_a_failing_weights_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first = make_model(0)
    checkpoint.save(tmp_path, 1, first, {"step": 1}, CONFIG)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, make_model(1), {"step": 2}, CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]  # no half-written leftovers
    loaded, _ = checkpoint.load_model(tmp_path)
    assert_same_weights(first, loaded)
    assert checkpoint.load_trainer_state(checkpoint.find(tmp_path)) == {"step": 1}


def test_a_crash_before_the_pointer_moves_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = make_model(0)
    checkpoint.save(tmp_path, 1, first, {"step": 1}, CONFIG)
    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, make_model(1), {"step": 2}, CONFIG)
    assert checkpoint.find(tmp_path).name == "step-00000001"
    loaded, _ = checkpoint.load_model(tmp_path)
    assert_same_weights(first, loaded)

    monkeypatch.setattr(os, "replace", real_replace)
    second = make_model(1)
    checkpoint.save(tmp_path, 2, second, {"step": 2}, CONFIG)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]
    assert_same_weights(second, checkpoint.load_model(tmp_path)[0])


def test_best_and_latest_are_kept_and_the_rest_pruned(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, make_model(step), {"step": step}, CONFIG,
                        pointers=("latest", "best") if step == 2 else ("latest",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest", "step-00000002", "step-00000003"]
    assert checkpoint.find(tmp_path, "best").name == "step-00000002"
    assert checkpoint.load_trainer_state(checkpoint.find(tmp_path)) == {"step": 3}


def test_find_explains_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no such run"):
        checkpoint.find(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.find(tmp_path / "empty")


def test_a_checkpoint_from_before_the_memory_sections_loads_with_its_weights(tmp_path):
    """An old run directory: flat memory fields in config.json (memory.persistent, memory.length),
    persistent vectors saved as attention.persistent_k/_v, no manifest. It loads through the
    config converter and the weight renaming into the same model."""
    from memlm.train.checkpoint import load_model, save
    torch.manual_seed(0)
    model = memlm.build("seed-tiny", layers=2, **{"memory.persistent.vectors": 3, "memory.xl.length": 8})
    config = {"model": model.config.to_dict(), "train": {}}
    folder = save(tmp_path / "checkpoints", 1, model, {}, config)
    old_model = dict(config["model"])
    old_model["memory"] = {"length": 8, "persistent": 3}
    (folder / "config.json").write_text(json.dumps({"model": old_model, "train": {}}))
    weights = {key.replace("persistent.k", "persistent_k").replace("persistent.v", "persistent_v"): value.contiguous()
               for key, value in model.state_dict().items() if key != "head.weight"}  # head: tied to the embedding
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"))
    (folder / "manifest.json").unlink()
    loaded, _ = load_model(folder)
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
