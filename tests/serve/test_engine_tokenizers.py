"""The server's Engine with a run's non-byte tokenizer: the prompt after that tokenizer's EOD, the
completion decoded by it (memlm.serve.engine; no web server needed)."""

from __future__ import annotations

import pytest
import torch

import memlm
from memlm.serve.engine import Completion, Engine

pytest.importorskip("tokenizers", reason="the tok extra (tokenizers) is not installed")


def test_engine_encodes_and_decodes_with_the_run_tokenizer():
    from memlm.data import make_tokenizer
    bpe = make_tokenizer("bpe:300", iter(["def add(a, b):\n    return a + b\n"] * 20))
    torch.manual_seed(0)
    model = memlm.build("seed-tiny", layers=2, width=32, seq_len=16, vocab_size=bpe.vocab_size,
                        **{"attention.heads": 2}).eval()
    prompt = "def add(a, b):"
    prompt_ids = bpe.encode(prompt).tolist()
    expected = memlm.generate(model, torch.tensor([bpe.eod, *prompt_ids]), max_new_tokens=12, temperature=0)
    new = expected[len(prompt_ids) + 1:].tolist()
    new = new[:new.index(bpe.eod)] if bpe.eod in new else new
    result = Completion()
    text = "".join(Engine(model, torch.device("cpu"), tokenizer=bpe).complete(prompt, 12, temperature=0,
                                                                                result=result))
    assert result.prompt_tokens == len(prompt_ids) < len(prompt)
    assert text == bpe.decode(new) and result.completion_tokens == min(12, len(new) + 1)
