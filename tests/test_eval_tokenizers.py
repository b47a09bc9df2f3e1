"""Bits per byte across tokenizers: evaluation divides total nats by the bytes the scored targets
stand for, so a byte model and a BPE model scored on the same text count the same bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.data import prepare
from memlm.eval import evaluate

pytest.importorskip("tokenizers", reason="the tok extra (tokenizers) is not installed")

FRACTIONS = (0.5, 0.25, 0.25)


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(24):
        (root / f"doc{i:02d}.py").write_text(f"# módulo {i} ✓ 日本\n" + "def add(a, b):\n    return a + b\n" * (i % 5 + 1))
    return root


def tiny(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return memlm.build("seed-tiny", layers=2, width=32, seq_len=16, vocab_size=vocab_size,
                       **{"attention.heads": 2}).eval()


def test_byte_and_bpe_models_count_the_same_bytes(corpus_dir):
    byte_corpus = prepare(str(corpus_dir), fractions=FRACTIONS, progress=False)
    bpe_corpus = prepare(str(corpus_dir), fractions=FRACTIONS, progress=False, tokenizer="bpe:300")
    for split in ("validation", "test"):
        info = byte_corpus.manifest["splits"][split]
        byte_split, bpe_split = byte_corpus.split(split), bpe_corpus.split(split)
        assert len(bpe_split) < len(byte_split)  # BPE: fewer tokens for the same text
        byte_result = evaluate(tiny(257), byte_split, 2, 16)
        bpe_result = evaluate(tiny(bpe_corpus.tokenizer.vocab_size), bpe_split, 2, 16)
        assert byte_result["bytes"] == bpe_result["bytes"] == info["bytes"] + info["documents"]  # + one per EOD
        assert byte_result["tokens"] == len(byte_split) and bpe_result["tokens"] == len(bpe_split)


def test_bytes_keep_bpb_equal_to_loss_over_ln2(corpus_dir):
    split = prepare(str(corpus_dir), fractions=FRACTIONS, progress=False).split("test")
    result = evaluate(tiny(257), split, 2, 16)
    assert result["bytes"] == result["tokens"] and result["bpb"] == result["loss"] / math.log(2)


@pytest.mark.parametrize("max_tokens", [None, 48])
def test_bpe_bpb_is_total_nats_over_bytes_by_hand(corpus_dir, max_tokens):
    corpus = prepare(str(corpus_dir), fractions=FRACTIONS, progress=False, tokenizer="bpe:300")
    tokenizer, split = corpus.tokenizer, corpus.split("test")
    model, seq_len = tiny(tokenizer.vocab_size), 16
    tokens = split.tokens.astype(np.int64)
    n = len(tokens)
    end = n if max_tokens is None else max_tokens // seq_len * seq_len  # one stream: the first segments
    nats, size = 0.0, 0
    for start in range(0, end, seq_len):
        stop = min(start + seq_len, end)
        x = torch.tensor(tokens[start:stop])[None]  # (1, T)
        y = [int(tokens[(p + 1) % n]) for p in range(start, stop)]  # the target of the split's end is its start
        with torch.no_grad():
            nats += F.cross_entropy(model(x).logits[0].float(), torch.tensor(y), reduction="sum").item()
        size += sum(len(tokenizer.token_bytes(t)) if t != tokenizer.eod else 1 for t in y)
    result = evaluate(model, split, 1, seq_len, max_tokens)
    assert result["bytes"] == size and result["tokens"] == end
    assert result["bpb"] == pytest.approx(nats / size / math.log(2), rel=1e-5)
    assert result["loss"] == pytest.approx(nats / end, rel=1e-5)
    assert result["bpb"] < 0.8 * result["loss"] / math.log(2)  # several bytes per token: not bits per token
