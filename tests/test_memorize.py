"""Knowledge memory (memlm.memorize): what is memorised, how it is read, saved and refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import memlm
from memlm.data.cache import TokenSplit
from memlm.memorize import KnowledgeError, check_target, load_memory, memorize, save_memory
from memlm.memory.knn.stores import StoreError
from tests.conftest import by_segments, tiny_overrides

T = 8


def build(**extra):
    base = tiny_overrides(layers=2, seq_len=T, **{"memory.knn.layers": [1], "memory.knn.k": 4,
                                                  "memory.knn.capacity": 64})
    base.update(extra)
    return memlm.build("seed-tiny", **base).eval()


def split_of(ids: torch.Tensor) -> TokenSplit:
    """One document (no EOD inside) as a split."""
    return TokenSplit("test", ids.numpy().astype(np.uint16), np.zeros(1, dtype=np.int64))


@pytest.mark.parametrize("mode", ["fill", "add", "replace"])
def test_knowledge_is_read_exactly_like_the_models_own_memory(mode):
    model = build()
    ids = torch.randint(0, 256, (1, 2 * T))
    own, state = by_segments(model, ids, T)  # segment 2 reads segment 1 from the row's own store
    stores, tokens = memorize(model, split_of(ids[0, :T]), batch_size=1)
    assert tokens == T and list(stores) == [1]
    knowledge = stores[1]
    assert knowledge.shared and knowledge.rows == 1 and int(knowledge.counts[0]) == T
    own_keys, own_values, own_positions = state.stores[1].entries(0)
    keys, values, positions = knowledge.entries(0)
    torch.testing.assert_close(keys[:, :T], own_keys[:, :T], atol=0, rtol=0)  # the very same entries
    torch.testing.assert_close(values[:, :T], own_values[:, :T], atol=0, rtol=0)
    assert positions.tolist() == list(range(T))

    # segment 2 as a fresh stream reading the knowledge memory (with its own store, still empty,
    # or instead of it): the same logits (RoPE is relative and memories have no position), for
    # every row of a batch
    model.knowledge, model.knowledge_mode = stores, mode
    fresh = model.init_state(3)
    store = fresh.stores[1]
    assert store is knowledge if mode == "replace" else (store.knowledge is knowledge and store.rows == 3)
    out = model(ids[:, T:].expand(3, T), state=fresh)
    for row in range(3):
        torch.testing.assert_close(out.logits[row], own[0, T:], atol=1e-5, rtol=0)
    assert int(knowledge.counts[0]) == T and int(knowledge.written[0]) == T  # knowledge: never written
    state = out.state.reset(torch.tensor([True, False, True]))  # reset skips the knowledge store
    assert int(knowledge.counts[0]) == T
    if mode != "replace":  # the completed segment went to each row's own store, which reset and saving see
        assert store.counts.tolist() == [0, T, 0] and state.state_dict()["stores"][1]["counts"].tolist() == [0, T, 0]
    else:
        assert 1 not in state.state_dict()["stores"]
    assert model.init_state(1, knowledge={}).stores[1] is not knowledge  # the per-row store again
    with pytest.raises(ValueError, match="shared store"):
        model.init_state(1, knowledge={0: knowledge})  # layer 0 is no kNN layer
    model.knowledge_mode = "both"
    with pytest.raises(ValueError, match="knowledge_mode"):
        model.init_state(1)


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_every_token_once_in_split_order_partial_segments_and_padding_included(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    model = build(**{"memory.knn.backend": backend})
    ids = torch.randint(0, 256, (1, 21))  # 2 streams of 10 and 11 tokens: a full segment, then 2 and 3 tokens
    stores, tokens = memorize(model, split_of(ids[0]), batch_size=2)
    keys, values, positions = stores[1].entries(0)
    assert tokens == 21 and int(stores[1].counts[0]) == 21 == stores[1].capacity
    assert positions.tolist() == list(range(21))  # row 0's stream, then row 1's; row 0's padding dropped
    assert keys.shape == (model.config.kv_heads, 21, model.config.head_dim) and stores[1].kind == backend
    last, _ = memorize(model, split_of(ids[0]), batch_size=2, capacity=5)
    assert last[1].capacity == 5 and last[1].entries(0)[2].tolist() == [16, 17, 18, 19, 20]  # FIFO: the last 5
    torch.testing.assert_close(last[1].entries(0)[0], keys[:, 16:], atol=0, rtol=0)
    one, tokens = memorize(model, split_of(ids[0]), batch_size=2, max_tokens=1)  # one segment per stream
    assert tokens == 16 and one[1].entries(0)[2].tolist() == list(range(8)) + list(range(10, 18))


def test_save_load_round_trip_and_refusals(tmp_path):
    model = build()
    stores, tokens = memorize(model, split_of(torch.randint(0, 256, (12,))), batch_size=1)
    target = tmp_path / "mem"
    save_memory(target, stores, {"tokens": tokens})
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["tokens"] == 12 and manifest["layers"]["1"]["entries"] == 12
    loaded = load_memory(target, model)
    assert list(loaded) == [1] and loaded[1].shared
    for a, b in zip(loaded[1].entries(0), stores[1].entries(0)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(StoreError, match="read-only"):
        loaded[1].write(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1))
    with pytest.raises(StoreError, match="read-only"):
        loaded[1].reset(torch.ones(1, dtype=torch.bool))
    save_memory(target, stores, {"tokens": tokens})  # an earlier memory is replaced

    with pytest.raises(KnowledgeError, match="no kNN layers"):
        load_memory(target, memlm.build("seed-tiny", **tiny_overrides(seq_len=T)))
    with pytest.raises(KnowledgeError, match="no kNN layers"):
        memorize(memlm.build("seed-tiny", **tiny_overrides(seq_len=T)), split_of(torch.zeros(8, dtype=torch.long)), 1)
    with pytest.raises(KnowledgeError, match="1 key/value heads x 8 dims, this model's layer 1 has 4 x 8"):
        load_memory(target, build(**{"attention.kv_heads": 4}))  # the memory holds 1 head x 8 dims
    with pytest.raises(KnowledgeError, match="not a kNN layer"):
        load_memory(target, build(**{"memory.knn.layers": [0]}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(KnowledgeError, match="not a knowledge memory"):
        check_target(tmp_path / "other")
    with pytest.raises(KnowledgeError, match="not a knowledge memory"):
        load_memory(tmp_path / "other", model)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
