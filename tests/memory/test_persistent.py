"""Persistent memory vectors (memlm.memory.persistent) on their own; their place in attention is
tested in tests/nn/test_attention.py, checkpoints and decoding in tests/memory/test_xl.py."""

import math

import pytest
import torch

from memlm.memory.persistent import PersistentMemory


@pytest.mark.parametrize("qk_norm", [False, True])
def test_the_partial_attention_is_one_softmax_over_the_vectors(qk_norm):
    torch.manual_seed(0)
    memory = PersistentMemory(kv_heads=1, vectors=5, head_dim=4, init_std=0.5)
    q = torch.randn(2, 3, 6, 4)  # 3 query heads share the one key/value head
    out, lse = memory(q, 0.7, 0.0, qk_norm)
    k = torch.nn.functional.normalize(memory.k[0], dim=-1) if qk_norm else memory.k[0]
    scores = 0.7 * q @ k.T  # (B, H, T, N)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, scores.softmax(-1) @ memory.v[0], atol=1e-6, rtol=1e-6)
    assert abs(memory.k.std().item() * math.sqrt(4) - 1) < 0.5 and memory.v.abs().max() < 5 * 0.5


def test_float32_vectors_serve_bfloat16_queries():
    torch.manual_seed(0)
    memory = PersistentMemory(kv_heads=2, vectors=3, head_dim=8, init_std=1.0)
    q = torch.randn(1, 2, 4, 8)
    out, _ = memory(q, 0.5, 0.0, False)
    low, _ = memory(q.to(torch.bfloat16), 0.5, 0.0, False)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, atol=5e-2, rtol=5e-2)
