"""Training streams of the recall task (memlm.tasks.recall_streams): rows, alignment, answer-only
targets, spread distances, exact resume."""

import math

import numpy as np
import pytest
import torch

import memlm
from memlm.data import EOD, DataError
from memlm.tasks.longrange import make_documents
from memlm.tasks.recall_streams import IGNORE, RecallStreams, spread_distance


def tiny_xl():
    return memlm.build("seed-xl-tiny", layers=1, width=32, seq_len=16,
                       **{"attention.heads": 2, "memory.xl.length": 64}).eval()


def stream_of(streams, row, length):
    """Row `row` of unaligned streams, rebuilt from its documents: (tokens, doc_start)."""
    tokens, starts = [], []
    index = 0
    while len(tokens) < length:
        doc = list(streams.document(row, index).text) + [EOD]
        starts += [True] + [False] * (len(doc) - 1)
        tokens += doc
        index += 1
    return torch.tensor(tokens), torch.tensor(starts)


def test_streams_continue_rows_across_batches():
    streams = RecallStreams(3, 24, distances=(0, 16, 50), seed=7, targets="all", spread=False, align=False)
    batches = [streams.next_batch() for _ in range(12)]
    x = torch.cat([b[0] for b in batches], dim=1)  # (3, 288)
    y = torch.cat([b[1] for b in batches], dim=1)
    doc_start = torch.cat([b[2] for b in batches], dim=1)
    assert x.shape == y.shape == doc_start.shape == (3, 288) and x.dtype == y.dtype == torch.long
    for row in range(3):
        tokens, starts = stream_of(streams, row, 289)
        assert torch.equal(x[row], tokens[:288]) and torch.equal(y[row], tokens[1:289])
        assert torch.equal(doc_start[row], starts[:288])
        assert doc_start[row, 0] and doc_start[row, 1:].sum() == (x[row, :-1] == EOD).sum()
    assert not torch.equal(x[0], x[1])
    distances = {streams.document(r, k).distance for r in range(3) for k in range(20)}
    assert distances == {0, 16, 50}
    segment = streams.next_segment()
    assert segment.valid.all() and segment.x.shape == (3, 24) and streams.step == 13


def test_aligned_streams_start_each_document_at_a_segment_and_train_only_its_answer():
    T = 24
    streams = RecallStreams(3, T, distances=(0, 16, 50), seed=7)  # the defaults: answers, spread, aligned
    segments = [streams.next_segment() for _ in range(30)]
    x, y, doc_start, valid = (torch.cat([s[i] for s in segments], dim=1) for i in range(4))
    # targets="all": every byte of a document (its EOD included) is a target, padding and the
    # step into the next document are not
    plain_streams = RecallStreams(3, T, distances=(0, 16, 50), seed=7, targets="all")
    plain = [plain_streams.next_segment() for _ in range(30)]
    assert torch.equal(torch.cat([p.x for p in plain], dim=1), x)
    every = torch.cat([p.y for p in plain], dim=1)
    trained = every != IGNORE
    assert torch.equal(trained[:, :-1], valid[:, :-1] & ~doc_start[:, 1:])  # EOD -> padding EOD included
    assert torch.equal(every[:, :-1][trained[:, :-1]], x[:, 1:][trained[:, :-1]])
    # targets="answers": a segment with no answer digit in any row keeps all targets (see the next test)
    fallback = torch.cat([torch.full((3, T), bool(torch.equal(s.y, p.y))) for s, p in zip(segments, plain)], dim=1)
    assert 0 < fallback[0].sum() < fallback.shape[1] / 2
    assert torch.equal(y[fallback], every[fallback])
    answers = 0
    for row in range(3):
        position, index = 0, 0
        while position + T <= x.shape[1]:
            doc = streams.document(row, index)
            n = len(doc.text) + 1  # bytes and EOD
            size = -(-n // T) * T
            assert position % T == 0 and doc_start[row, position]
            assert not doc_start[row, position + 1:position + size].any()
            end = min(position + size, x.shape[1])
            want = torch.tensor(list(doc.text) + [EOD] * (size - n + 1))[:end - position]
            assert torch.equal(x[row, position:end], want)  # the document, EOD, then EOD padding
            assert torch.equal(valid[row, position:end], torch.arange(end - position) < n)
            # elsewhere the only targets are the answer digits, each predicted from the byte before it
            kept = ~fallback[row, position:end]
            live = ((y[row, position:end] != IGNORE) & kept).nonzero().flatten().tolist()
            first = doc.answer_offset - 1
            assert live == [p for p in range(first, first + len(doc.answer)) if p < end - position and kept[p]]
            assert bytes(y[row, position + first:position + first + len(live)].tolist()) == doc.answer[:len(live)]
            answers += len(live)
            position, index = position + size, index + 1
    assert answers > 50


def test_answer_free_batches_are_trained_on_all_their_bytes():
    """Distance 300 in segments of 16: most segments hold no answer digit in any row; they keep
    every target of targets="all" (the loss is never over zero targets), the others only the answers."""
    streams = RecallStreams(2, 16, distances=(300,), seed=0, spread=False)
    plain = RecallStreams(2, 16, distances=(300,), seed=0, spread=False, targets="all")
    kinds = []
    for _ in range(60):
        segment, every = streams.next_segment(), plain.next_segment()
        assert torch.equal(segment.x, every.x)
        live = segment.y != IGNORE
        assert live.any() and torch.equal(segment.y[live], every.y[live])
        if torch.equal(segment.y, every.y):
            kinds.append("all")
        else:  # only the answer digits of some row: at most 5 a row
            assert bytes(segment.y[live].tolist()).isdigit() and live.sum(1).max() <= 5
            kinds.append("answers")
    assert 0 < kinds.count("answers") < kinds.count("all")
    # 49 bytes with EOD in segments of 16: every fourth segment holds only the EOD, then padding;
    # its one target (EOD -> EOD) keeps the loss defined
    lone = RecallStreams(1, 16, distances=(10,), seed=0, spread=False)
    segments = [lone.next_segment() for _ in range(12)]
    assert all((s.y != IGNORE).any() for s in segments)
    assert segments[3].valid.sum() == 1 and segments[3].y[0].tolist() == [EOD] + [IGNORE] * 15


def test_the_training_loss_is_the_answer_digit_nll():
    """What the trainer optimises on a batch is the scorer's digit NLL of those answers."""
    model = tiny_xl()
    streams = RecallStreams(4, 16, distances=(3,), seed=2, spread=False)
    for _ in range(5):
        x, y, _ = streams.next_batch()
        live = y != IGNORE
        if live.any() and not live.all():
            break
    out = model(x, targets=y)
    logprob = out.logits.double().log_softmax(-1)
    expected = -logprob[live].gather(-1, y[live][:, None]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert live.sum() % 5 == 0 and bytes(y[live].tolist()).isdigit()


def test_spread_distances_are_log_uniform_up_to_the_longest():
    rng = np.random.default_rng(0)
    drawn = np.array([spread_distance(rng, 2048) for _ in range(20000)])
    assert drawn.min() == 0 and drawn.max() == 2048
    octaves = np.bincount(np.log2(drawn + 1).astype(int))  # [0], [1, 2], [3, 6], ..., [1023, 2046]
    assert len(octaves) == 12 and abs(octaves[:11] / len(drawn) - 1 / math.log2(2050)).max() < 0.01
    assert spread_distance(rng, 0) == 0
    streams = RecallStreams(2, 32, distances=(16, 256), seed=3)
    distances = [streams.document(r, k).distance for r in range(2) for k in range(300)]
    assert min(distances) == 0 and max(distances) <= 256 and len(set(distances)) > 100
    assert 0.4 < np.mean(np.array(distances) < 16) < 0.6  # ln 17 / ln 258 = 0.51
    fixed = RecallStreams(2, 32, distances=(16, 256), seed=3, spread=False)
    assert {fixed.document(r, k).distance for r in range(2) for k in range(40)} == {16, 256}


def test_streams_resume_exactly_and_ranks_are_global_rows():
    a = RecallStreams(2, 40, distances=(30, 90), seed=1)
    for _ in range(5):
        a.next_batch()
    saved = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    b = RecallStreams(2, 40, distances=(30, 90), seed=1)
    b.load_state_dict(saved)
    for want, got in zip(expected, [b.next_batch() for _ in range(4)]):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert b.state_dict() == a.state_dict() and b.step == 9
    for changed in [dict(distances=(30,)), dict(targets="all"), dict(align=False), dict(spread=False)]:
        with pytest.raises(DataError, match="cannot resume"):
            RecallStreams(2, 40, **{"distances": (30, 90), "seed": 1, **changed}).load_state_dict(saved)
    # streams saved before targets/spread/align existed were plain language modelling
    old = RecallStreams(2, 40, distances=(30, 90), seed=1, targets="all", spread=False, align=False)
    layout = {k: v for k, v in old.state_dict()["layout"].items() if k not in ("targets", "spread", "align")}
    old.load_state_dict({**old.state_dict(), "layout": layout})
    with pytest.raises(DataError, match="cannot resume"):
        RecallStreams(2, 40, distances=(30, 90), seed=1).load_state_dict({**old.state_dict(), "layout": layout})
    whole = RecallStreams(4, 40, distances=(30, 90), seed=1).next_batch()[0]
    rank1 = RecallStreams(2, 40, distances=(30, 90), seed=1, rank=1, world_size=2).next_batch()[0]
    assert torch.equal(whole[2:], rank1)
    # training documents are not evaluation documents
    assert a.document(0, 0).text not in {d.text for d in make_documents(50, a.document(0, 0).distance, seed=1)}
    with pytest.raises(DataError, match="targets"):
        RecallStreams(2, 40, targets="digits")


def test_train_config_checks_recall_targets():
    from memlm.config import ConfigError
    from memlm.train import TrainConfig
    assert TrainConfig().recall_targets == "answers"
    TrainConfig(recall_targets="all").validate()
    with pytest.raises(ConfigError, match="recall_targets"):
        TrainConfig(recall_targets="digits").validate()
