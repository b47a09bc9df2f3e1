"""Evaluation: bits per byte over every target of a split, by hand on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.data import EOD, TokenSplit
from memlm.eval import evaluate


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return memlm.build("seed-tiny", layers=2, width=32, seq_len=16, **{"attention.heads": 2}).eval()


def make_split(lengths: list[int], seed: int = 0) -> TokenSplit:
    """Documents of random bytes of the given lengths, each followed by EOD."""
    rng = np.random.default_rng(seed)
    tokens, starts = [], []
    for n in lengths:
        starts.append(sum(len(t) for t in tokens))
        tokens.append(np.append(rng.integers(0, 256, n), EOD))
    return TokenSplit("test", np.concatenate(tokens).astype(np.uint16), np.array(starts, dtype=np.int64))


def segment_nll(model, tokens: np.ndarray, start: int, end: int) -> float:
    """Summed cross-entropy (nats) of the targets of positions start..end-1 scored as one segment;
    the target of position p is token p + 1 (the first token after the last)."""
    n = len(tokens)
    x = torch.tensor(tokens[start:end], dtype=torch.long)[None]  # (1, T)
    y = torch.tensor([tokens[(p + 1) % n] for p in range(start, end)], dtype=torch.long)  # (T,)
    with torch.no_grad():
        return F.cross_entropy(model(x).logits[0].float(), y, reduction="sum").item()


@pytest.mark.parametrize("batch_size,seq_len", [(1, 64), (2, 8), (3, 5)])
def test_bpb_is_the_mean_loss_over_every_target_over_ln2(batch_size, seq_len):
    model, split = tiny(), make_split([12, 20, 9])  # 44 tokens, EODs included
    tokens, n = split.tokens.astype(np.int64), len(split)
    bounds = [b * n // batch_size for b in range(batch_size + 1)]  # the contiguous streams
    total = sum(segment_nll(model, tokens, s, min(s + seq_len, bounds[b + 1]))
                for b in range(batch_size) for s in range(bounds[b], bounds[b + 1], seq_len))
    result = evaluate(model, split, batch_size, seq_len)
    assert result["tokens"] == n == 44
    assert result["loss"] == pytest.approx(total / n, rel=1e-5)
    assert result["bpb"] == pytest.approx(total / n / math.log(2), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_max_tokens_scores_the_first_segments_of_every_stream():
    model, split = tiny(), make_split([29, 29, 29])  # 90 tokens: streams [0, 45) and [45, 90)
    tokens = split.tokens.astype(np.int64)
    result = evaluate(model, split, 2, 8, max_tokens=40)  # 40 // (2 * 8) = 2 segments per stream
    total = sum(segment_nll(model, tokens, s, s + 8) for s in (0, 8, 45, 53))
    assert result["tokens"] == 32
    assert result["loss"] == pytest.approx(total / 32, rel=1e-5)
    assert evaluate(model, split, 2, 8, max_tokens=5)["tokens"] == 16  # at least one segment


def test_stateful_evaluation_carries_the_state_across_segments():
    """The memory hook: with the state carried, a model without memory keeps a growing key/value
    cache, so each stream is scored as if it were one long segment."""
    model, split = tiny(), make_split([47])  # one document: no row resets inside a stream
    tokens, n = split.tokens.astype(np.int64), len(split)
    full = sum(segment_nll(model, tokens, s, e) for s, e in [(0, n // 2), (n // 2, n)])
    stateful = evaluate(model, split, 2, 6, stateful=True)
    stateless = evaluate(model, split, 2, 6)
    assert stateful["tokens"] == stateless["tokens"] == n
    assert stateful["loss"] == pytest.approx(full / n, rel=1e-5)
    assert abs(stateless["loss"] - stateful["loss"]) > 1e-4  # short segments see less context


def test_evaluate_restores_training_mode():
    model = tiny().train()
    evaluate(model, make_split([20]), 1, 8)
    assert model.training
