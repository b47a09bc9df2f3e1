"""The long-range recall task (memlm.tasks.longrange): documents, and scoring (oracles, segment identity)."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import memlm
from memlm.tasks.longrange import filler, make_documents, recall_accuracy, recall_markdown, score_documents

DEFINITION = re.compile(rb"key (\d+) is (\d+)\.\n")


# ----- documents -------------------------------------------------------------------------

@pytest.mark.parametrize("pairs", [1, 3])
@pytest.mark.parametrize("distance", [0, 1, 7, 200, 1000])
def test_documents_layout(distance, pairs):
    docs = make_documents(6, distance, seed=3, pairs=pairs)
    assert len({len(d.text) for d in docs}) == 1 and len({d.answer_offset for d in docs}) == 1  # batchable
    for d in docs:
        definitions = DEFINITION.findall(d.text[:d.filler_offset])
        assert len(definitions) == pairs and len({k for k, _ in definitions}) == pairs
        assert d.filler_offset == pairs * len(b"key 1234 is 12345.\n")
        # the rule: the filler between the last definition and the query is exactly `distance` bytes
        assert d.query_offset - d.filler_offset == distance == d.distance
        body = d.text[d.filler_offset:d.query_offset]
        assert not re.search(rb"\d", body) and b"key" not in body
        assert body == b"" or body.endswith(b"\n")
        # the query asks for a defined key, and the answer is its value
        query = d.text[d.query_offset:]
        assert query == b"key " + d.key + b" is " + d.answer + b".\n"
        assert d.text[d.answer_offset:d.answer_offset + 5] == d.answer and len(d.answer) == 5
        assert dict(definitions)[d.key] == d.answer
        assert d.text[d.definition_offset:].startswith(b"key " + d.key + b" is " + d.answer + b".\n")
        assert d.ids.tolist() == list(d.text)


def test_documents_deterministic_by_seed():
    a, b = make_documents(5, 300, seed=1), make_documents(5, 300, seed=1)
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.text for d in make_documents(3, 300, seed=1)] == [d.text for d in a[:3]]  # prefix property
    other = make_documents(5, 300, seed=2)
    assert sum(x.text == y.text for x, y in zip(a, other)) == 0
    assert len({d.answer for d in a}) == 5


def test_filler_kinds_and_exact_length():
    for kind in ["mixed", "english", "python"]:
        for length in [0, 1, 2, 50, 333]:
            text = filler(np.random.default_rng(0), length, kind)
            assert len(text) == length and not re.search(r"\d", text)
    assert "def " in filler(np.random.default_rng(0), 2000, "python")
    assert "(" not in filler(np.random.default_rng(0), 2000, "english")
    with pytest.raises(ValueError):
        filler(np.random.default_rng(0), 10, "latin")


# ----- scoring with fake models ------------------------------------------------------------

class FakeModel:
    """The model protocol recall_accuracy uses: config, init_state, eval/train, __call__.
    Its state is the byte history so far (B, t)."""

    def __init__(self, stateful: bool, seq_len: int, vocab: int = 257):
        self.config = SimpleNamespace(stateful=stateful, seq_len=seq_len)
        self.vocab, self.training, self.calls = vocab, True, []

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def init_state(self, batch_size, device=None):
        return torch.zeros(batch_size, 0, dtype=torch.long)

    def __call__(self, input_ids, state=None):
        self.calls.append(input_ids.shape[1])
        history = input_ids if state is None else torch.cat([state, input_ids], dim=1)
        logits = self.logits(history, input_ids.shape[1])
        return SimpleNamespace(logits=logits, state=history if state is not None else None)

    def logits(self, history, T):
        return torch.zeros(history.shape[0], T, self.vocab)


class RecallOracle(FakeModel):
    """Solves the task from what it sees: after `key K is <digits>` it puts all mass on the next
    digit of K's value if a definition of K is in its visible history; elsewhere uniform."""

    def logits(self, history, T):
        logits = torch.zeros(history.shape[0], T, self.vocab)
        for b, row in enumerate(history.tolist()):
            text = bytes(row)
            for t in range(T):
                seen = text[:len(text) - T + t + 1]
                query = re.search(rb"key (\d+) is (\d*)$", seen)
                if not query:
                    continue
                found = re.search(rb"key " + query[1] + rb" is (\d+)\.", seen[:query.start()])
                if found and len(query[2]) < len(found[1]):
                    logits[b, t] = -1e9
                    logits[b, t, found[1][len(query[2])]] = 0.0
        return logits


def test_oracle_with_memory_recalls_everything():
    model = RecallOracle(stateful=True, seq_len=64)
    result = recall_accuracy(model, distances=(8, 200), n=5, batch_size=2, pairs=3)
    assert [r["accuracy"] for r in result["by_distance"]] == [1.0, 1.0]
    assert [r["digit_nll"] for r in result["by_distance"]] == [0.0, 0.0]
    assert [r["documents"] for r in result["by_distance"]] == [5, 5]
    assert result["stateful"] is True and model.training  # training mode restored
    # distance 200, pairs 3: answer digits at 57 + 200 + 12 = 269..273; inputs 0..272 in segments of 64
    assert model.calls[-3:] == [64, 64, 17]


def test_oracle_without_memory_sees_only_its_window():
    model = RecallOracle(stateful=False, seq_len=64)
    result = recall_accuracy(model, distances=(8, 64, 200), n=4, batch_size=4)
    # distance 8: the whole document (19 + 8 + 12 + 5 bytes) lies in the first window: recalled;
    # distance >= seq_len: the definition lies in an earlier window: a uniform guess
    assert [r["accuracy"] for r in result["by_distance"]] == [1.0, 0.0, 0.0]
    nll = [r["digit_nll"] for r in result["by_distance"]]
    assert nll == [0.0, math.log(257), math.log(257)]
    # distance 200: answer predicted from inputs 230..234, all in window 3 = [192, 256): one call of 43 bytes
    assert model.calls[-1] == 235 - 192
    # the same oracle with its memory forced on recalls everything
    forced = recall_accuracy(model, distances=(64, 200), n=4, batch_size=4, stateful=True)
    assert [r["accuracy"] for r in forced["by_distance"]] == [1.0, 1.0]


@pytest.mark.parametrize("stateful", [True, False])
def test_uniform_model_scores_zero_and_ln_vocab(stateful):
    for vocab in (257, 300):
        result = recall_accuracy(FakeModel(stateful, 32, vocab), distances=(16, 100), n=3, batch_size=2)
        for row in result["by_distance"]:
            assert row["accuracy"] == 0.0  # argmax of uniform logits is id 0, never a digit
            assert row["digit_nll"] == math.log(vocab)
    table = recall_markdown(result)
    assert "| 100 | 3 | 0.000 | 5.704 |" in table and sum(line.startswith("|") for line in table.splitlines()) == 2 + 2


def test_answers_straddling_windows_are_scored_per_window():
    """Distance 8: the definition is inputs 0..18, the answer is predicted from inputs 38..42."""
    docs = make_documents(2, 8, seed=0)
    assert docs[0].answer_offset == 39
    scores = score_documents(RecallOracle(False, 43), docs, stateful=False)  # all in window 0
    assert scores["correct"].tolist() == [[True, True, True, True, True]] * 2 and scores["logprob"].shape == (2, 5)
    scores = score_documents(RecallOracle(False, 35), docs, stateful=False)  # all in window 1 = [35, 70)
    assert scores["correct"].tolist() == [[False] * 5] * 2
    scores = score_documents(RecallOracle(False, 40), docs, stateful=False)  # window 2 starts at input 40
    assert scores["correct"].tolist() == [[True, True, False, False, False]] * 2
    with pytest.raises(ValueError, match="answer offset"):
        score_documents(RecallOracle(False, 40), docs + make_documents(1, 9, seed=0), batch_size=3)


# ----- a real model ------------------------------------------------------------------------

def tiny_xl():
    return memlm.build("seed-xl-tiny", layers=1, width=32, seq_len=16,
                       **{"attention.heads": 2, "memory.xl.length": 64}).eval()


def reference_logprobs(model, docs, window=None):
    """log p(answer digits) from one pass over each whole document, or from its own window."""
    rows = []
    for d in docs:
        ids = d.ids[None]
        picked = []
        for p in range(d.answer_offset - 1, d.answer_offset + len(d.answer) - 1):
            start = 0 if window is None else p // window * window
            logits = model(ids[:, start:p + 1]).logits[0, -1].double()
            picked.append(logits.log_softmax(-1)[ids[0, p + 1]])
        rows.append(torch.stack(picked))
    return torch.stack(rows)


def test_segments_with_memory_equal_one_pass():
    model = tiny_xl()
    assert model.config.stateful
    docs = make_documents(3, 40, seed=5)
    assert len(docs[0].text) <= 16 + 64  # the memory holds every earlier segment
    scores = score_documents(model, docs, batch_size=2)
    expected = reference_logprobs(model, docs)
    torch.testing.assert_close(scores["logprob"], expected, atol=1e-4, rtol=0)
    expected_correct = torch.stack([torch.tensor([model(d.ids[None, :p + 1]).logits[0, -1].argmax().item()
                                                  == d.text[p + 1] for p in range(d.answer_offset - 1,
                                                                                  d.answer_offset + 4)])
                                    for d in docs])
    assert torch.equal(scores["correct"], expected_correct)
    # the windowed baseline of the same model equals scoring each digit in its own window, and differs
    windowed = score_documents(model, docs, batch_size=2, stateful=False)
    torch.testing.assert_close(windowed["logprob"], reference_logprobs(model, docs, window=16), atol=1e-4, rtol=0)
    assert (windowed["logprob"] - scores["logprob"]).abs().max() > 1e-3


def test_recall_accuracy_on_a_real_model():
    model = tiny_xl().train()
    result = recall_accuracy(model, distances=(8, 40), n=3, batch_size=2)
    assert model.training
    assert result["stateful"] is True and result["seq_len"] == 16
    assert [r["distance"] for r in result["by_distance"]] == [8, 40]
    assert [r["documents"] for r in result["by_distance"]] == [3, 3]
    for row in result["by_distance"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 < row["digit_nll"] < 20.0
    scores = score_documents(model, make_documents(3, 40), batch_size=2)
    assert result["by_distance"][1]["digit_nll"] == pytest.approx(-scores["logprob"].mean().item(), abs=1e-9)
