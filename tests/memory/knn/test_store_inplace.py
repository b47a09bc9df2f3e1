"""kNN stores change the tensors a search reads in place, so a CUDA graph that captured a search
(memlm.decode.static_memory) stays valid across writes and resets; a captured search covers the
whole capacity, since later writes are not captured again."""

import torch

from memlm.memory.knn import exact
from memlm.memory.knn.exact import ExactStore


def test_write_and_reset_keep_the_searched_tensors_and_update_them():
    store = ExactStore(rows=2, heads=1, dim=4, capacity=8, fused=False)
    before = store.tensors()
    keys = torch.randn(2, 1, 5, 4)
    store.write(keys, torch.randn(2, 1, 5, 4), torch.arange(5))
    store.write(keys, torch.randn(2, 1, 5, 4), torch.arange(5, 10))
    assert all(a is b for a, b in zip(before, store.tensors()))
    assert store.counts.tolist() == [8, 8] and store.written.tolist() == [10, 10]
    store.reset(torch.tensor([True, False]))
    assert all(a is b for a, b in zip(before, store.tensors()))
    assert store.counts.tolist() == [0, 8]


def test_a_search_being_captured_scores_the_whole_capacity(monkeypatch):
    store = ExactStore(rows=1, heads=1, dim=4, capacity=64, fused=False)
    store.write(torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4), torch.arange(10))
    q = torch.randn(1, 1, 3, 4)
    searched = []
    chunked = store._chunked_topk
    monkeypatch.setattr(store, "_chunked_topk", lambda x, keys, counts, kk: searched.append(keys.shape[1])
                        or chunked(x, keys, counts, kk))
    eager = store.search(q, k=4)
    monkeypatch.setattr(exact, "capturing_graph", lambda device: True)
    captured = store.search(q, k=4)
    assert searched == [10, 64]  # the written slots only, then every slot
    torch.testing.assert_close(captured.scores, eager.scores, rtol=1e-6, atol=1e-6)  # matmul shapes differ
    assert torch.equal(eager.keys, captured.keys) and torch.equal(eager.valid, captured.valid)
