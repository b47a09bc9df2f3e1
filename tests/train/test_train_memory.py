"""Training models with memory: streams, carried state, resets, and exact resume."""

from __future__ import annotations

import pytest
import torch
from test_train_resume import losses, train_until_crash
from train_helpers import fast_config, tiny_model

from memlm.train import Trainer, checkpoint, train

MECHANISMS = {
    "xl": {"memory.xl.length": 32},
    "feedback": {"memory.xl.length": 32, "memory.feedback.mode": "memory"},
    "span+compressive": {"memory.xl.length": 32, "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.5,
                         "memory.compressive.rate": 4, "memory.compressive.length": 8},
    "persistent": {"memory.xl.length": 16, "memory.persistent.vectors": 8, "feedforward.kind": "none"},
    "tokens": {"memory.tokens.count": 4, "memory.tokens.recurrent": True},
    "knn": {"memory.knn.layers": [1], "memory.knn.k": 8, "memory.knn.capacity": 256},
    "tokens+xl+knn": {"memory.tokens.count": 4, "memory.tokens.recurrent": True, "memory.xl.length": 16,
                      "memory.knn.layers": [1], "memory.knn.k": 8, "memory.knn.capacity": 256},
}


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_training_with_memory_lowers_the_loss_on_streams(corpus, tmp_path, name):
    model = tiny_model().replace(**MECHANISMS[name])
    summary = train(model, fast_config(corpus, tmp_path / name, steps=30, eval_every=30, checkpoint_every=30,
                                       lr=1e-2))
    train_losses = losses(tmp_path / name)
    assert train_losses[30] < train_losses[1] - 0.5
    assert summary["test_bpb"] < train_losses[1] / 0.6931
    assert sum(row["tokens"] for row in summary["test_by_position"]) == summary["test_tokens"]


def test_memory_trainer_uses_streams_and_carries_a_detached_state(corpus, tmp_path, monkeypatch):
    seen = []
    original = Trainer.train_step

    def spy(self):
        result = original(self)
        seen.append((self.state.position, self.state.layers[0].mem.shape[1], self.state.layers[0].mem.requires_grad))
        return result

    monkeypatch.setattr(Trainer, "train_step", spy)
    train(tiny_model().replace(**{"memory.xl.length": 48}), fast_config(corpus, tmp_path / "run", steps=3))
    assert seen == [(32, 32, False), (64, 48, False), (96, 48, False)]


def row_starts_per_step(monkeypatch, corpus, out, **memory):
    """Train the tiny XL model 8 steps; per step, the rows whose state was reset during it."""
    starts = []
    original = Trainer.train_step

    def spy(self):
        position = self.state.position
        result = original(self)
        starts.append((self.state.row_start == position).tolist())
        return result

    monkeypatch.setattr(Trainer, "train_step", spy)
    train(tiny_model().replace(**{"memory.xl.length": 32, "memory.reset_at_document": False, **memory}),
          fast_config(corpus, out, steps=8, checkpoint_every=8, eval_every=8))
    monkeypatch.undo()
    return starts


def test_train_reset_forgets_random_rows_the_same_way_each_run(corpus, tmp_path, monkeypatch):
    never = row_starts_per_step(monkeypatch, corpus, tmp_path / "never")
    assert not any(any(step) for step in never[1:])  # documents are carried across; nothing is forgotten
    drawn = row_starts_per_step(monkeypatch, corpus, tmp_path / "drawn", **{"memory.train_reset": 0.5})
    resets = sum(sum(step) for step in drawn[1:])  # 7 steps x 4 rows, each forgotten with probability 0.5
    assert 5 <= resets <= 23
    again = row_starts_per_step(monkeypatch, corpus, tmp_path / "again", **{"memory.train_reset": 0.5})
    assert again == drawn


RESUMED = {**MECHANISMS, "xl+train_reset": {"memory.xl.length": 32, "memory.train_reset": 0.3}}


@pytest.mark.parametrize("name", ["span+compressive", "knn", "xl+train_reset"])
def test_resume_with_memory_is_exact(corpus, tmp_path, monkeypatch, name):
    model = tiny_model().replace(**RESUMED[name])
    straight = tmp_path / "straight"
    train(model, fast_config(corpus, straight, steps=12, checkpoint_every=4))
    crashed = tmp_path / "crashed"
    train_until_crash(monkeypatch, model, fast_config(corpus, crashed, steps=12, checkpoint_every=4), 7)
    train(model, fast_config(corpus, crashed, steps=12, checkpoint_every=4, resume=True))
    expected, resumed = losses(straight), losses(crashed)
    for step in range(5, 13):
        assert resumed[step] == expected[step], step
    a, _ = checkpoint.load_model(straight)
    b, _ = checkpoint.load_model(crashed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_recall_task_trains_on_recall_streams_and_scores_recall(corpus, tmp_path, monkeypatch):
    batches = []
    original = Trainer.train_step

    def spy(self):
        batches.append(list(self.loader.doc))  # document index of each row before the step
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", spy)
    model = tiny_model().replace(**{"memory.xl.length": 32})
    summary = train(model, fast_config(corpus, tmp_path / "recall", steps=40, eval_every=40, checkpoint_every=40,
                                       lr=1e-2, task="recall", recall_distances=(8, 40)))
    # every batch row reads recall documents one after the other (document indices only grow)
    assert batches[0] == [0, 0, 0, 0] and all(a <= b for a, b in zip(batches[0], batches[-1]))
    assert max(batches[-1]) >= 1
    with_memory, windowed = summary["recall"]["memory"], summary["recall"]["windowed"]
    assert with_memory["stateful"] and not windowed["stateful"]
    assert [row["distance"] for row in with_memory["by_distance"]] == [8, 40]
    assert all(row["documents"] == 64 for row in windowed["by_distance"])
    # 40 steps on recall documents learn their bytes: answer digits cost far less than at
    # initialisation (about ln 257 = 5.55 nats, a uniform guess over the vocabulary)
    assert with_memory["by_distance"][0]["digit_nll"] < 4.5
    assert (tmp_path / "recall" / "recall.md").read_text().count("| 8 |") == 2


def test_recall_task_options_are_checked():
    from memlm.config import ConfigError
    from memlm.train import TrainConfig
    with pytest.raises(ConfigError, match="task"):
        TrainConfig(task="summarise").validate()
    with pytest.raises(ConfigError, match="recall_distances"):
        TrainConfig(recall_distances=()).validate()


def test_compiled_memory_training_raises_the_recompile_limit(corpus, tmp_path):
    """Filling memories and learned spans compile new graphs; past dynamo's default limit (8)
    the forward would run eagerly for the rest of the run, so a compiled model with memory
    trains under MEMORY_RECOMPILE_LIMIT, and a model without memory leaves the limit alone."""
    from memlm.train import distributed
    from memlm.state import MEMORY_RECOMPILE_LIMIT

    info = distributed.setup("cpu")
    # dynamo's own patching: monkeypatch's undo deleted the setting from dynamo's config module,
    # which broke every later compilation in the process
    with torch._dynamo.config.patch(recompile_limit=8):
        Trainer(tiny_model(), fast_config(corpus, tmp_path / "plain", compile=True), info)
        assert torch._dynamo.config.recompile_limit == 8
        Trainer(tiny_model().replace(**{"memory.xl.length": 32}), fast_config(corpus, tmp_path / "xl", compile=True),
                info)
        assert torch._dynamo.config.recompile_limit == MEMORY_RECOMPILE_LIMIT > 8


def test_recall_distances_default_to_the_segment_length(corpus, tmp_path):
    """Without --recall_distances the task asks inside a window (L/4, 3L/4), one segment back
    (3L/2: what an XL memory of one segment holds) and three back (3L)."""
    from memlm.tasks import distances_for
    from memlm.train import distributed

    assert distances_for(512) == (128, 384, 768, 1536)
    with pytest.raises(ValueError, match="seq_len"):
        distances_for(2)
    trainer = Trainer(tiny_model(), fast_config(corpus, tmp_path / "run", task="recall"), distributed.setup("cpu"))
    assert trainer.config.recall_distances is None and trainer.recall_distances == (8, 24, 48, 96)  # seq_len 32
    assert trainer.loader.distances == (8, 24, 48, 96)
    given = Trainer(tiny_model(), fast_config(corpus, tmp_path / "given", task="recall", recall_distances=(5, 7)),
                    distributed.setup("cpu"))
    assert given.recall_distances == (5, 7)
