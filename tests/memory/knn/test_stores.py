"""kNN memory stores (memlm.memory.knn.stores): exact top-k, faiss recall, FIFO eviction, resets,
ids across eviction, persistence with checksums, shared read-only stores, padding."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from memlm.memory.knn.stores import (ExactStore, FaissStore, Retrieved, StoreError, load_store,
                                 make_store)

BACKENDS = [("exact", {}), ("faiss", {}), ("faiss", {"index": "ivf"}), ("faiss", {"index": "hnsw"})]
IDS = ["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """torch and faiss on one thread: on a busy machine their idle OpenMP threads spin against
    the one doing the work, and every faiss call on these tiny stores then takes ~50 ms instead
    of microseconds. Results do not depend on it."""
    try:
        import faiss
    except ImportError:
        faiss = None
    threads = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    if faiss:
        faiss.omp_set_num_threads(threads[1])


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def fill(store, total, chunk, start=0):
    """Write `total` random unit keys per row in chunks; values = 3 * keys. Returns the keys
    (B, Hkv, total, D) and positions (total,) written."""
    keys = unit(store.rows, store.heads, total, store.dim)
    for i in range(0, total, chunk):
        piece = keys[:, :, i:i + chunk]
        store.write(piece, 3 * piece, torch.arange(start + i, start + i + piece.shape[2]))
    return keys, torch.arange(start, start + total)


def brute_force(keys, positions, q, k):
    """Plain torch top-k: keys (B, Hkv, n, D) live entries, q (B, H, T, D) ->
    scores (B, H, T, k), keys (B, H, T, k, D), positions (B, H, T, k)."""
    G = q.shape[1] // keys.shape[1]
    kv = keys.repeat_interleave(G, dim=1)  # (B, H, n, D)
    scores = q @ kv.transpose(-1, -2)  # (B, H, T, n)
    top = scores.topk(k, dim=-1)
    idx = top.indices
    picked = torch.gather(kv[:, :, None].expand(-1, -1, q.shape[2], -1, -1), 3,
                          idx[..., None].expand(-1, -1, -1, -1, keys.shape[-1]))
    return top.values, picked, positions[idx]


def recall(found, truth):
    """Mean fraction of the true top-k positions found; found, truth (..., k)."""
    f, t = found.reshape(-1, found.shape[-1]).tolist(), truth.reshape(-1, truth.shape[-1]).tolist()
    return sum(len(set(a) & set(b)) for a, b in zip(f, t)) / truth.numel()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_exact_store_returns_the_brute_force_top_k(heads, kv_heads):
    store = make_store("exact", rows=3, heads=kv_heads, dim=16, capacity=50, device="cpu")
    keys, positions = fill(store, 130, 40)  # wraps the ring twice
    live, live_pos = keys[:, :, -50:], positions[-50:]
    q = unit(3, heads, 7, 16)
    out, pos = store.search(q, 6, return_positions=True)
    assert isinstance(out, Retrieved) and out.keys.shape == (3, heads, 7, 6, 16) and out.valid.all()
    scores, picked, want_pos = brute_force(live, live_pos, q, 6)
    torch.testing.assert_close(out.scores, scores, rtol=0, atol=1e-6)
    assert torch.equal(pos, want_pos)
    assert torch.equal(out.keys, picked)
    assert torch.equal(out.values, 3 * picked)

    # chunked scoring gives the same answer: two (row, head) groups at a time, or 3 queries at a time
    queries = 7 * heads // kv_heads
    for chunk in (2 * queries * 50, 3 * 50):
        small = make_store("exact", rows=3, heads=kv_heads, dim=16, capacity=50, chunk_elements=chunk)
        small.load_state_dict(store.state_dict())
        again, again_pos = small.search(q, 6, return_positions=True)
        assert torch.equal(again_pos, pos) and torch.equal(again.keys, out.keys)


def test_rows_are_independent_and_positions_may_differ_per_row():
    store = ExactStore(rows=2, heads=1, dim=8, capacity=10)
    keys = unit(2, 1, 4, 8)
    store.write(keys, keys, torch.tensor([[0, 1, 2, 3], [100, 101, 102, 103]]))
    out, pos = store.search(keys[:, :, :1], 1, return_positions=True)  # each row's first key
    assert pos.flatten().tolist() == [0, 100]
    torch.testing.assert_close(out.scores.flatten(), torch.ones(2))
    q = keys.flip(0)[:, :, :1]  # row 1's key asked in row 0: row 0 never holds it
    assert store.search(q, 1).scores.flatten().lt(0.999).all()


@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_faiss_recall_at_default_settings_on_random_data(index, dim):
    """Uniform random unit keys and queries, every setting at its default: recall@k >= 0.9
    against exact search for k = 10 and 32 (ivf calibrates nprobe, hnsw searches with ef 256)."""
    exact = make_store("exact", rows=1, heads=1, dim=dim, capacity=5000)
    store = make_store("faiss", rows=1, heads=1, dim=dim, capacity=5000, index=index)
    keys = unit(1, 1, 5000, dim)
    for s in (exact, store):
        for i in range(0, 5000, 1000):
            s.write(keys[:, :, i:i + 1000], keys[:, :, i:i + 1000], torch.arange(i, i + 1000))
    q = unit(1, 2, 200, dim)
    for k in (10, 32):
        truth, want = exact.search(q, k, return_positions=True)
        out, found = store.search(q, k, return_positions=True)
        r = recall(found, want)
        if index == "flat":
            assert r == 1.0
            torch.testing.assert_close(out.scores, truth.scores, rtol=0, atol=1e-5)
        else:
            assert r >= 0.9, (index, dim, k, r)
        assert out.valid.all()
    if index == "ivf":  # the calibrated nprobe; random data needs many lists
        assert store.nprobe is None and all(i.is_trained and 1 <= i.nprobe <= store.nlist for i in store.indexes[0])
    if index == "flat":
        assert store.indexes is None  # the keys live only in the ring buffer


def test_faiss_ivf_calibrates_few_probes_on_clustered_data_and_honours_an_explicit_nprobe():
    centers = torch.randn(40, 32)
    clustered = F.normalize(centers[torch.randint(40, (5000,))] + 0.7 * torch.randn(5000, 32), dim=-1)
    queries = F.normalize(centers[torch.randint(40, (200,))] + 0.7 * torch.randn(200, 32), dim=-1)
    random_store = make_store("faiss-ivf", 1, 1, 32, 5000)
    random_store.write(unit(1, 1, 5000, 32), unit(1, 1, 5000, 32), torch.arange(5000))
    exact = make_store("exact", 1, 1, 32, 5000)
    exact.write(clustered[None, None], clustered[None, None], torch.arange(5000))
    _, want = exact.search(queries[None, None], 10, return_positions=True)
    for options in ({}, {"nprobe": 35}):
        ivf = make_store("faiss-ivf", 1, 1, 32, 5000, **options)
        assert ivf.nlist == 70 and ivf.train_size == 2730
        ivf.write(clustered[None, None], clustered[None, None], torch.arange(5000))
        assert all(index.is_trained for index in ivf.indexes[0])
        _, found = ivf.search(queries[None, None], 10, return_positions=True)
        assert recall(found, want) >= 0.9
        if options:
            assert ivf.indexes[0][0].nprobe == 35
        else:  # clustered keys need far fewer probes than random ones
            assert ivf.indexes[0][0].nprobe <= 10 < random_store.indexes[0][0].nprobe
    with pytest.raises(ValueError, match="nprobe"):
        make_store("faiss-ivf", 1, 1, 32, 5000, nprobe=0)


@pytest.mark.parametrize("kind,options", BACKENDS, ids=IDS)
def test_eviction_keeps_the_last_capacity_entries_in_order(kind, options):
    store = make_store(kind, rows=2, heads=2, dim=8, capacity=40, **options)
    keys, positions = fill(store, 100, 7)  # 2.5 x capacity, writes that straddle the wrap
    assert store.counts.tolist() == [40, 40] and store.written.tolist() == [100, 100]
    for row in range(2):
        k, v, p = store.entries(row)
        assert torch.equal(k, keys[row, :, -40:]) and torch.equal(v, 3 * keys[row, :, -40:])
        assert torch.equal(p, positions[-40:])
    # one write longer than the memory keeps only its tail
    more = unit(2, 2, 90, 8)
    store.write(more, 3 * more, torch.arange(100, 190))
    k, _, p = store.entries(1)
    assert torch.equal(k, more[1, :, -40:]) and p.tolist() == list(range(150, 190))
    assert store.written.tolist() == [190, 190]
    # searching with every live key finds itself at the top
    out, pos = store.search(store.entries(0)[0][None, :].repeat(2, 1, 1, 1), 1, return_positions=True)
    assert pos[0, :, :, 0].tolist() == [list(range(150, 190))] * 2


@pytest.mark.parametrize("kind,options", BACKENDS, ids=IDS)
def test_reset_clears_only_the_masked_rows(kind, options):
    store = make_store(kind, rows=3, heads=1, dim=8, capacity=30, **options)
    fill(store, 45, 15)
    q = unit(3, 2, 5, 8)
    before, before_pos = store.search(q, 4, return_positions=True)
    store.reset(torch.tensor([False, True, False]))
    after, after_pos = store.search(q, 4, return_positions=True)
    assert store.counts.tolist() == [30, 0, 30] and store.written.tolist() == [45, 0, 45]
    for row in (0, 2):
        assert torch.equal(after.keys[row], before.keys[row]) and torch.equal(after_pos[row], before_pos[row])
    assert not after.valid[1].any() and torch.isinf(after.scores[1]).all() and (after_pos[1] == -1).all()
    assert not after.keys[1].any() and not after.values[1].any()
    fresh = unit(3, 1, 2, 8)
    store.write(fresh, 3 * fresh, torch.arange(45, 47))
    k, _, p = store.entries(1)
    assert torch.equal(k, fresh[1]) and p.tolist() == [45, 46]
    store.clear()
    assert store.counts.tolist() == [0, 0, 0] and not store.search(q, 2).valid.any()


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_faiss_ids_stay_right_across_eviction(index):
    store = make_store("faiss", rows=2, heads=2, dim=16, capacity=300, index=index, train_size=200,
                       nlist=8, nprobe=8)
    keys, positions = fill(store, 1000, 64)  # the ivf/hnsw indexes compact more than once
    for r in range(2):
        for h in range(2):
            assert index == "flat" and store.indexes is None or store.indexes[r][h].ntotal < 2 * 300
    evicted = keys[:, :, :700]  # (2, 2, 700, 16)
    G = 2
    q = evicted.repeat_interleave(G, dim=1)  # (2, 4, 700, 16): query heads 2h, 2h+1 read kv head h
    out, pos = store.search(q, 3, return_positions=True)
    assert out.valid.all()
    assert (pos >= 700).all()  # an evicted entry is never returned
    assert out.scores[..., 0].lt(0.9999).all()
    torch.testing.assert_close(out.values, 3 * out.keys)  # values come with their own keys
    live = keys[:, :, 700:]
    out, pos = store.search(live.repeat_interleave(G, dim=1), 1, return_positions=True)
    assert torch.equal(pos[..., 0], positions[700:].expand(2, 4, -1))  # each live key finds itself
    torch.testing.assert_close(out.keys[..., 0, :], live.repeat_interleave(G, dim=1))
    torch.testing.assert_close(out.values[..., 0, :], 3 * live.repeat_interleave(G, dim=1))


@pytest.mark.parametrize("kind,options", BACKENDS, ids=IDS)
def test_save_and_load_give_identical_retrievals(kind, options, tmp_path):
    store = make_store(kind, rows=2, heads=2, dim=16, capacity=600, **options)
    fill(store, 900, 128)
    q = unit(2, 4, 9, 16)
    want, want_pos = store.search(q, 8, return_positions=True)

    path = store.save(tmp_path / "store")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == store.kind and manifest["counts"] == [600, 600] and manifest["written"] == [900, 900]
    assert manifest["write_pointer"] == [300, 300] and manifest["options"] == store.options()
    assert set(manifest["files"]) >= {"keys.safetensors", "values.safetensors", "positions.safetensors"}
    assert ("indexes.safetensors" in manifest["files"]) == (options.get("index") in ("ivf", "hnsw"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    loaded = load_store(path, "cpu", kind=store.kind, heads=2, dim=16)
    assert type(loaded) is type(store) and loaded.options() == store.options()
    got, got_pos = loaded.search(q, 8, return_positions=True)
    assert torch.equal(got_pos, want_pos)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for name, t in store.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name

    # a checkpoint round trip through state_dict is the same
    again = make_store(kind, rows=2, heads=2, dim=16, capacity=600, **options)
    again.load_state_dict(store.state_dict())
    assert torch.equal(again.search(q, 8, return_positions=True)[1], want_pos)

    # saving again over it replaces it, still atomically
    fill(store, 10, 10, start=900)
    store.save(path)
    assert load_store(path).written.tolist() == [910, 910]


def test_corrupted_truncated_missing_or_mismatched_files_raise(tmp_path):
    store = make_store("faiss-hnsw", rows=1, heads=1, dim=8, capacity=20)
    fill(store, 30, 10)
    path = store.save(tmp_path / "s")

    def broken(edit):
        target = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        store.save(target)
        edit(target)
        return target

    def flip(p):
        data = bytearray((p / "values.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (p / "values.safetensors").write_bytes(bytes(data))

    with pytest.raises(StoreError, match=r"values\.safetensors.*corrupted"):
        load_store(broken(flip))
    with pytest.raises(StoreError, match=r"indexes\.safetensors.*corrupted or truncated"):
        load_store(broken(lambda p: (p / "indexes.safetensors").write_bytes(
            (p / "indexes.safetensors").read_bytes()[:100])))
    with pytest.raises(StoreError, match=r"missing store file .*positions\.safetensors"):
        load_store(broken(lambda p: (p / "positions.safetensors").unlink()))
    with pytest.raises(StoreError, match=r"manifest\.json"):
        load_store(broken(lambda p: (p / "manifest.json").write_text("{not json")))

    def edit_manifest(**fields):
        def edit(p):
            m = json.loads((p / "manifest.json").read_text())
            m.update(fields)
            (p / "manifest.json").write_text(json.dumps(m))
        return edit

    with pytest.raises(StoreError, match=r"keys\.safetensors holds keys of shape \(1, 1, 20, 8\).*\(1, 1, 20, 16\)"):
        load_store(broken(edit_manifest(dim=16)))  # checksums fine, shapes not
    with pytest.raises(StoreError, match="inconsistent"):
        load_store(broken(edit_manifest(counts=[5])))
    with pytest.raises(StoreError, match="version"):
        load_store(broken(edit_manifest(version=99)))
    with pytest.raises(StoreError, match=r"dim=8, expected 16"):
        load_store(path, dim=16)  # what the caller expects is checked too
    with pytest.raises(StoreError, match=r"index='hnsw', expected 'flat'"):
        load_store(path, kind="faiss", index="flat")
    assert load_store(path, kind="faiss", index="hnsw", rows=1).options()["index"] == "hnsw"
    with pytest.raises(StoreError, match="state"):
        make_store("faiss-hnsw", rows=1, heads=1, dim=8, capacity=30).load_state_dict(store.state_dict())
    with pytest.raises(StoreError, match="refusing to overwrite"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        store.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert load_store(path).written.tolist() == [30]  # the intact one still loads


@pytest.mark.parametrize("kind,options", BACKENDS, ids=IDS)
def test_shared_read_only_store_serves_every_row_alike(kind, options, tmp_path):
    store = make_store(kind, rows=1, heads=2, dim=16, capacity=500, **options)
    fill(store, 500, 100)
    q1 = unit(1, 4, 6, 16)
    alone, alone_pos = store.search(q1, 5, return_positions=True)
    store.share()
    out, pos = store.search(q1.expand(3, -1, -1, -1), 5, return_positions=True)
    for row in range(3):
        assert torch.equal(pos[row], alone_pos[0]) and torch.equal(out.keys[row], alone.keys[0])
        assert torch.equal(out.scores[row], alone.scores[0])
    if isinstance(store, ExactStore):  # the batch folded into the queries, scored a few at a time
        store.chunk_elements = 3 * 500
        assert torch.equal(store.search(q1.expand(3, -1, -1, -1), 5, return_positions=True)[1], pos)
    keys = unit(1, 2, 3, 16)
    with pytest.raises(StoreError, match="read-only"):
        store.write(keys, keys, torch.arange(3))
    with pytest.raises(StoreError, match="read-only"):
        store.reset(torch.tensor([True]))
    with pytest.raises(StoreError, match="read-only"):
        store.clear()
    assert store.counts.tolist() == [500]
    loaded = load_store(store.save(tmp_path / "knowledge"))
    assert loaded.shared and torch.equal(loaded.search(q1.expand(4, -1, -1, -1), 5, return_positions=True)[1][3],
                                         alone_pos[0])
    with pytest.raises(StoreError, match="one-row"):
        make_store(kind, rows=2, heads=1, dim=4, capacity=4, **options).share()


@pytest.mark.parametrize("kind,options", BACKENDS, ids=IDS)
def test_missing_entries_are_invalid_with_minus_inf_scores(kind, options):
    store = make_store(kind, rows=3, heads=1, dim=8, capacity=4, **options)
    keys = unit(3, 1, 3, 8)
    store.write(keys, keys, torch.arange(3))
    store.reset(torch.tensor([True, False, False]))  # row 0 empty, rows 1 and 2 hold 3 entries
    more = unit(3, 1, 2, 8)
    store.write(more, more, torch.arange(3, 5))  # row 0: 2 entries, rows 1, 2: 4 (full)
    out = store.search(unit(3, 2, 5, 8), 6)  # k > capacity
    assert out.valid.sum(-1)[:, 0, 0].tolist() == [2, 4, 4]
    want = torch.arange(6)[None, :] < torch.tensor([2, 4, 4])[:, None]  # (3, 6) valid ranks come first
    assert torch.equal(out.valid, want[:, None, None, :].expand(3, 2, 5, 6))
    assert torch.isinf(out.scores[~out.valid]).all() and (out.scores[~out.valid] < 0).all()
    assert torch.isfinite(out.scores[out.valid]).all()
    assert not out.keys[~out.valid].any() and not out.values[~out.valid].any()
    assert (out.scores[..., :-1] >= out.scores[..., 1:]).all()  # best first


def test_writes_are_detached_and_results_follow_the_query_dtype():
    store = make_store("exact", rows=1, heads=1, dim=4, capacity=8)
    keys = unit(1, 1, 3, 4).requires_grad_()
    store.write(keys * 2, keys, torch.arange(3))
    assert not store.keys.requires_grad
    q = unit(1, 1, 2, 4).requires_grad_()
    out = store.search(q, 2)
    assert not out.keys.requires_grad and not out.scores.requires_grad
    assert store.search(q.detach().double(), 2).keys.dtype == torch.float64


@pytest.mark.parametrize("kind,options", BACKENDS, ids=IDS)
def test_results_in_a_requested_dtype_equal_the_cast_results(kind, options):
    """search(q, k, dtype=bf16) with float32 queries (as a kNN layer under autocast asks) returns
    exactly the float32 results cast to bf16: same entries, no float32 copy on the way."""
    if kind == "faiss":
        pytest.importorskip("faiss")
    store = make_store(kind, rows=2, heads=1, dim=8, capacity=64, **options)
    fill(store, 40, 20)
    q = unit(2, 2, 5, 8)
    plain, positions = store.search(q, 4, return_positions=True)
    cast, cast_positions = store.search(q, 4, return_positions=True, dtype=torch.bfloat16)
    assert torch.equal(cast_positions, positions) and cast.keys.dtype == torch.bfloat16
    for got, want in zip(cast, plain):
        assert torch.equal(got, want.to(torch.bfloat16) if want.is_floating_point() else want)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown kNN store kind 'annoy'"):
        make_store("annoy", 1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown faiss index"):
        make_store("faiss", 1, 1, 4, 4, index="pq")
    store = make_store("exact", rows=2, heads=2, dim=4, capacity=4)
    with pytest.raises(ValueError, match="multiple"):
        store.search(unit(2, 3, 1, 4), 1)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="rows"):
        store.search(unit(3, 2, 1, 4), 1)
    with pytest.raises(ValueError, match="write expects keys"):
        store.write(unit(2, 1, 1, 4), unit(2, 1, 1, 4), torch.arange(1))
    with pytest.raises(ValueError, match="positions"):
        store.write(unit(2, 2, 2, 4), unit(2, 2, 2, 4), torch.arange(3))
    assert isinstance(make_store("faiss-ivf", 1, 1, 4, 4), FaissStore)


def test_own_store_with_knowledge_reads_the_best_of_both_and_writes_only_its_own():
    """WithKnowledge in add mode (knowledge memory added to a layer's own store): a search equals
    brute force over each row's own entries together with the shared entries; writes and resets
    reach the own store only."""
    from memlm.memory.knn.stores import WithKnowledge

    torch.manual_seed(0)
    own = make_store("exact", rows=2, heads=1, dim=8, capacity=30)
    own_keys, _ = fill(own, 12, 5)  # (2, 1, 12, 8), positions 0..11
    knowledge = make_store("exact", rows=1, heads=1, dim=8, capacity=40)
    shared_keys, _ = fill(knowledge, 40, 20, start=1000)  # positions 1000..1039
    both = WithKnowledge(own, knowledge.share(), mode="add")
    q = unit(2, 2, 5, 8)
    out, pos = both.search(q, 6, return_positions=True)
    for row in range(2):  # brute force over the row's 12 entries and the 40 shared ones
        keys = torch.cat([own_keys[row:row + 1], shared_keys], dim=2)  # (1, 1, 52, 8)
        scores, picked, want_pos = brute_force(keys, torch.cat([torch.arange(12), torch.arange(1000, 1040)]),
                                               q[row:row + 1], 6)
        torch.testing.assert_close(out.scores[row:row + 1], scores, rtol=0, atol=1e-6)
        assert torch.equal(pos[row:row + 1], want_pos) and torch.equal(out.keys[row:row + 1], picked)
        assert torch.equal(out.values[row:row + 1], 3 * picked)
    assert (pos < 12).any() and (pos >= 1000).any()  # both stores contribute here

    fill(both, 3, 3, start=12)  # writes go to the own store
    assert own.counts.tolist() == [15, 15] and knowledge.counts.tolist() == [40]
    both.reset(torch.tensor([True, False]))
    assert own.counts.tolist() == [0, 15] and knowledge.counts.tolist() == [40]
    after, pos = both.search(q, 6, return_positions=True)  # row 0 forgot its past, row 1 did not
    assert bool((pos[0] >= 1000).all()) and after.valid.all() and (pos[1] < 1000).any()
    assert torch.equal(both.search(q, 6, dtype=torch.bfloat16).keys, after.keys.to(torch.bfloat16))
    with pytest.raises(StoreError, match="shared knowledge store"):
        WithKnowledge(knowledge, knowledge)
    with pytest.raises(StoreError, match="mode"):
        WithKnowledge(own, knowledge, mode="mix")


def test_knowledge_fills_the_slots_the_own_past_leaves_empty():
    """fill mode: a row's own entries first (its own top k, in order), then the knowledge's best
    in order, as many as the own past leaves empty: all of them for an empty row, none for a row
    holding k entries or more."""
    from memlm.memory.knn.stores import WithKnowledge

    torch.manual_seed(1)
    own = make_store("exact", rows=3, heads=1, dim=8, capacity=30)
    fill(own, 10, 10)
    own.reset(torch.tensor([False, True, False]))
    fill(own, 2, 2, start=10)
    own.reset(torch.tensor([True, False, False]))
    assert own.counts.tolist() == [0, 2, 12]  # an empty row, one short of k = 5, one past it
    knowledge = make_store("exact", rows=1, heads=1, dim=8, capacity=40)
    fill(knowledge, 40, 20, start=1000)
    both = WithKnowledge(own, knowledge.share())  # fill is the default
    q = unit(3, 2, 4, 8)
    out, pos = both.search(q, 5, return_positions=True)
    mine, mine_pos = own.search(q, 5, return_positions=True)
    theirs, theirs_pos = knowledge.search(q, 5, return_positions=True)
    assert torch.equal(pos[0], theirs_pos[0]) and torch.equal(out.keys[0], theirs.keys[0])  # empty row
    assert torch.equal(pos[1, ..., :2], mine_pos[1, ..., :2]) and torch.equal(pos[1, ..., 2:], theirs_pos[1, ..., :3])
    assert torch.equal(out.scores[1, ..., :2], mine.scores[1, ..., :2])
    assert torch.equal(out.values[1, ..., 2:, :], theirs.values[1, ..., :3, :])
    assert torch.equal(pos[2], mine_pos[2]) and torch.equal(out.keys[2], mine.keys[2])  # a full row: its own only
    assert out.valid.all()


# ----- a reference model: every entry written, kept by the test, searched by brute force in float64 -----

class Reference:
    """What a store should hold and return, kept independently: per row a list of (keys (Hkv, D),
    values (Hkv, D), position) in write order, cut to the last `capacity`; search by sorting
    float64 inner products."""

    def __init__(self, rows, heads, capacity):
        self.rows, self.heads, self.capacity = rows, heads, capacity
        self.entries = [[] for _ in range(rows)]

    def write(self, keys, values, positions):
        positions = positions.expand(keys.shape[0], keys.shape[2]) if positions.dim() == 1 else positions
        for r in range(self.rows):
            for t in range(keys.shape[2]):
                self.entries[r].append((keys[r, :, t].double(), values[r, :, t].double(), int(positions[r, t])))
            self.entries[r] = self.entries[r][-self.capacity:]

    def reset(self, rows):
        for r in rows:
            self.entries[r] = []

    def search(self, q, k, row_of=None):
        """q (B, H, T, D) -> scores (B, H, T, k) float64 (-inf where missing), positions (B, H, T, k)
        (-1), keys, values (B, H, T, k, D) float64 (0)."""
        B, H, T, D = q.shape
        G = H // self.heads
        scores = torch.full((B, H, T, k), float("-inf"), dtype=torch.float64)
        positions = torch.full((B, H, T, k), -1, dtype=torch.long)
        keys = torch.zeros(B, H, T, k, D, dtype=torch.float64)
        values = torch.zeros(B, H, T, k, D, dtype=torch.float64)
        for b in range(B):
            entries = self.entries[b if row_of is None else row_of(b)]
            n = min(k, len(entries))
            if n == 0:
                continue
            kv = torch.stack([e[0] for e in entries], 1).repeat_interleave(G, 0)  # (H, m, D)
            vv = torch.stack([e[1] for e in entries], 1).repeat_interleave(G, 0)
            pp = torch.tensor([e[2] for e in entries])
            s = q[b].double() @ kv.transpose(1, 2)  # (H, T, m)
            order = s.argsort(dim=-1, descending=True, stable=True)[..., :n]  # (H, T, n)
            scores[b, ..., :n] = s.gather(-1, order)
            positions[b, ..., :n] = pp[order]
            heads = torch.arange(H)[:, None, None]
            keys[b, :, :, :n] = kv[heads, order]
            values[b, :, :, :n] = vv[heads, order]
        return scores, positions, keys, values


def assert_matches_reference(out, pos, ref, q, k, row_of=None, atol=1e-5):
    scores, want_pos, keys, values = ref.search(q, k, row_of)
    assert torch.equal(pos, want_pos)
    assert torch.equal(out.valid, want_pos >= 0)
    torch.testing.assert_close(out.scores.double(), scores, rtol=0, atol=atol)
    torch.testing.assert_close(out.keys.double(), keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.values.double(), values, rtol=0, atol=1e-6)


SMALL = [("exact", {}), ("exact", {"chunk_elements": 20}), ("faiss", {}),
         ("faiss", {"index": "ivf", "nlist": 2, "nprobe": 2, "train_size": 5}), ("faiss", {"index": "hnsw"})]
SMALL_IDS = ["exact", "exact-chunked", "faiss-flat", "faiss-ivf-exhaustive", "faiss-hnsw"]


@pytest.mark.parametrize("kind,options", SMALL, ids=SMALL_IDS)
def test_a_store_follows_the_reference_through_writes_wraps_and_resets(kind, options):
    """From empty through one entry, a partial fill, wraps, a write longer than the memory,
    empty writes, per-row positions and resets of single rows: counts, written, entries and
    every search (k from 1 to past the capacity, grouped query heads) equal the reference."""
    torch.manual_seed(2)
    rows, heads, dim, capacity = 3, 2, 8, 7
    store = make_store(kind, rows=rows, heads=heads, dim=dim, capacity=capacity, **options)
    ref = Reference(rows, heads, capacity)
    written = [0] * rows
    steps = [("write", 1), ("write", 0), ("write", 3), ("reset", [1]), ("write", 4), ("write", 2),
             ("reset", [0, 2]), ("write", 11), ("write", 5), ("reset", [2]), ("write", 1), ("write", 6)]
    q = unit(rows, 4, 3, dim)
    for step, (action, arg) in enumerate([("search", None)] + steps):
        if action == "write":
            keys, values = unit(rows, heads, arg, dim), torch.randn(rows, heads, arg, dim)
            per_row = step % 2 == 0
            positions = (torch.arange(arg)[None] + torch.tensor([0, 100, 200])[:, None] if per_row
                         else torch.arange(arg)) + 10 * step
            store.write(keys, values, positions)
            ref.write(keys, values, positions)
            written = [w + arg for w in written]
        elif action == "reset":
            store.reset(torch.tensor([r in arg for r in range(rows)]))
            ref.reset(arg)
            written = [0 if r in arg else w for r, w in enumerate(written)]
        assert store.written.tolist() == written
        assert store.counts.tolist() == [len(e) for e in ref.entries] == [min(w, capacity) for w in written]
        for r in range(rows):
            k_, v_, p_ = store.entries(r)
            assert p_.tolist() == [e[2] for e in ref.entries[r]]
            if ref.entries[r]:
                assert torch.equal(k_.transpose(0, 1).double(), torch.stack([e[0] for e in ref.entries[r]]))
                assert torch.equal(v_.transpose(0, 1).double(), torch.stack([e[1] for e in ref.entries[r]]))
            else:
                assert k_.shape == (heads, 0, dim) and v_.shape == (heads, 0, dim)
        for k in (1, 2, capacity, capacity + 3):
            out, pos = store.search(q, k, return_positions=True)
            assert_matches_reference(out, pos, ref, q, k)
    assert torch.equal(store.entries()[2], store.entries(0)[2])  # row 0 by default


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_sizes_must_be_positive_ints_and_a_fresh_store_is_empty(kind):
    sizes = {"rows": 2, "heads": 3, "dim": 4, "capacity": 5}
    for name in sizes:
        for bad in (0, -2, True, 2.0, "3"):
            with pytest.raises(ValueError, match=rf"^store {name} must be a positive int, got {re.escape(repr(bad))}$"):
                make_store(kind, **{**sizes, name: bad})
    with pytest.raises(ValueError, match=r"^a shared store has exactly one row, got rows=2$"):
        make_store(kind, **sizes, shared=True)
    assert make_store(kind, **{**sizes, "rows": 1}, shared=True).shared
    store = make_store(kind, **sizes)
    assert (store.rows, store.heads, store.dim, store.capacity, store.shared) == (2, 3, 4, 5, False)
    state = store.state_dict()
    assert torch.equal(state["keys"], torch.zeros(2, 3, 5, 4)) and torch.equal(state["values"], torch.zeros(2, 3, 5, 4))
    assert torch.equal(state["positions"], torch.full((2, 5), -1)) and state["positions"].dtype == torch.long
    assert state["counts"].tolist() == [0, 0] and state["written"].tolist() == [0, 0]
    assert state["counts"].dtype == state["written"].dtype == torch.long
    assert store.keys.dtype == torch.float32 and store.device == torch.device("cpu")
    out, pos = store.search(unit(2, 6, 3, 4), 4, return_positions=True)  # nothing written: nothing found
    assert not out.valid.any() and (pos == -1).all() and torch.equal(out.scores, torch.full((2, 6, 3, 4), float("-inf")))
    assert not out.keys.any() and not out.values.any()
    # the smallest store: one slot
    tiny = make_store(kind, rows=1, heads=1, dim=1, capacity=1)
    for i, x in enumerate((1.0, -1.0)):
        tiny.write(torch.tensor([[[[x]]]]), torch.tensor([[[[7 * x]]]]), torch.tensor([i]))
        out, pos = tiny.search(torch.tensor([[[[2.0]]]]), 2, return_positions=True)
        assert pos.tolist() == [[[[i, -1]]]] and out.scores.tolist() == [[[[2 * x, float("-inf")]]]]
        assert out.values.tolist() == [[[[[7 * x], [0.0]]]]]


def test_repr_and_options_name_the_settings():
    exact = make_store("exact", rows=2, heads=3, dim=4, capacity=5)
    assert exact.options() == {"chunk_elements": 2 ** 27, "fused": True}  # the defaults
    assert repr(exact) == f"ExactStore(rows=2, heads=3, dim=4, capacity=5, chunk_elements={2 ** 27}, fused=True)"
    small = make_store("exact", rows=1, heads=1, dim=4, capacity=5, chunk_elements=7, fused=False, shared=True)
    assert small.options() == {"chunk_elements": 7, "fused": False}
    assert repr(small) == "ExactStore(rows=1, heads=1, dim=4, capacity=5, chunk_elements=7, fused=False, shared)"
    assert make_store("faiss", 1, 1, 4, 5).options() == {"index": "flat"}
    assert repr(make_store("faiss-flat", 1, 1, 4, 5)) == "FaissStore(rows=1, heads=1, dim=4, capacity=5, index='flat')"
    ivf = make_store("faiss-ivf", 1, 2, 4, 100, nlist=3, nprobe=2, train_size=50)
    assert ivf.options() == {"index": "ivf", "nlist": 3, "nprobe": 2, "train_size": 50}
    assert repr(ivf) == "FaissStore(rows=1, heads=2, dim=4, capacity=100, index='ivf', nlist=3, nprobe=2, train_size=50)"
    hnsw = make_store("faiss", 1, 1, 4, 5, index="hnsw", hnsw_m=8, ef_construction=20, ef_search=30)
    assert hnsw.options() == {"index": "hnsw", "hnsw_m": 8, "ef_construction": 20, "ef_search": 30}
    assert make_store("faiss-hnsw", 1, 1, 4, 5).options() == {"index": "hnsw", "hnsw_m": 32, "ef_construction": 80,
                                                               "ef_search": 256}  # the documented defaults


@pytest.mark.parametrize("kind,options", [("exact", {"dtype": "float64", "chunk_elements": 9}), ("faiss", {}),
                                          ("faiss", {"index": "ivf", "nlist": 2, "train_size": 4}),
                                          ("faiss", {"index": "hnsw", "hnsw_m": 4})],
                         ids=["exact-float64", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_save_writes_the_documented_manifest_and_files(kind, options, tmp_path):
    import hashlib

    from safetensors.torch import load_file

    store = make_store(kind, rows=2, heads=2, dim=4, capacity=5, **options)
    keys = unit(2, 2, 7, 4).to(store.keys.dtype)
    store.write(keys, 3 * keys, torch.arange(10, 17))
    store.reset(torch.tensor([False, True]))
    store.write(keys[:, :, :3], 3 * keys[:, :, :3], torch.tensor([[17, 18, 19], [0, 1, 2]]))
    path = store.save(tmp_path / "deep" / "store")
    assert path == tmp_path / "deep" / "store"
    manifest = json.loads((path / "manifest.json").read_text())
    indexed = options.get("index") in ("ivf", "hnsw")
    names = ["keys.safetensors", "values.safetensors", "positions.safetensors"] + ["indexes.safetensors"] * indexed
    assert sorted(p.name for p in path.iterdir()) == sorted(names + ["manifest.json"])
    files = {}
    for name in names:
        data = (path / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest == {"format": "memlm.knn-store", "version": 1, "kind": kind, "rows": 2, "heads": 2, "dim": 4,
                        "capacity": 5, "dtype": "float64" if kind == "exact" else "float32", "shared": False,
                        "options": store.options(), "counts": [5, 3], "written": [10, 3], "write_pointer": [0, 3],
                        "files": files}
    state = store.state_dict()
    for name in ("keys", "values", "positions"):
        saved = load_file(str(path / f"{name}.safetensors"))
        assert list(saved) == [name] and torch.equal(saved[name], state[name]) and saved[name].dtype == state[name].dtype
    if indexed:
        saved = load_file(str(path / "indexes.safetensors"))
        assert sorted(saved) == [f"index.{r}.{h}" for r in range(2) for h in range(2)]
        for name, blob in saved.items():
            assert blob.dtype == torch.uint8 and torch.equal(blob, state[name])
    loaded = load_store(path)
    assert type(loaded) is type(store) and loaded.options() == store.options() and not loaded.shared
    for name, t in state.items():
        assert torch.equal(loaded.state_dict()[name], t) and loaded.state_dict()[name].dtype == t.dtype, name
    q = unit(2, 4, 3, 4).to(store.keys.dtype)
    for a, b in zip(loaded.search(q, 4, return_positions=True)[0], store.search(q, 4, return_positions=True)[0]):
        assert torch.equal(a, b)


def _saved(tmp_path, name, kind="exact", rows=1, edit=None, **options):
    """A small store saved under tmp_path/name, then `edit(path, manifest)` applied (the manifest
    as a dict, written back afterwards)."""
    store = make_store(kind, rows=rows, heads=1, dim=4, capacity=6, **options)
    keys = unit(rows, 1, 8, 4)
    store.write(keys, 3 * keys, torch.arange(8))
    path = store.save(tmp_path / name)
    if edit is not None:
        manifest = json.loads((path / "manifest.json").read_text())
        edit(path, manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _rewrite(path, manifest, name, data):
    """Replace a store file and record its new size and checksum, so only its content is wrong."""
    import hashlib

    (path / name).write_bytes(data)
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_load_store_names_each_fault(tmp_path):
    from safetensors.torch import save as save_bytes

    def fails(path, message, **kwargs):
        with pytest.raises(StoreError, match="^" + message + "$"):
            load_store(path, **kwargs)

    esc = re.escape
    m = esc(str(tmp_path / "none" / "manifest.json"))
    fails(tmp_path / "none", rf"cannot read the store manifest {m}: .*No such file.*")
    path = _saved(tmp_path, "text", edit=lambda p, m: None)
    (path / "manifest.json").write_text("{not json")
    fails(path, rf"cannot read the store manifest {esc(str(path / 'manifest.json'))}: .*")

    def field(**changes):
        return lambda p, m: m.update(changes)

    path = _saved(tmp_path, "format", edit=field(format="other"))
    fails(path, rf"{esc(str(path / 'manifest.json'))} is not a memlm kNN store of version 1 \(format 'other', version 1\)")
    path = _saved(tmp_path, "version", edit=field(version=2))
    fails(path, rf"{esc(str(path / 'manifest.json'))} is not a memlm kNN store of version 1 "
                r"\(format 'memlm.knn-store', version 2\)")
    good = _saved(tmp_path, "good")
    mg = esc(str(good / "manifest.json"))
    fails(good, rf"{mg}: the saved store has capacity=6, expected 7", capacity=7)
    fails(good, rf"{mg}: the saved store has chunk_elements={2 ** 27}, expected 5", rows=1, chunk_elements=5)
    fails(good, rf"{mg}: the saved store has index=None, expected 'ivf'", index="ivf")
    assert load_store(good, kind="exact", rows=1, heads=1, dim=4, capacity=6, dtype="float32", shared=False,
                      fused=True).written.tolist() == [8]

    for name in ("kind", "rows", "counts", "written", "write_pointer", "files", "options", "dtype"):
        path = _saved(tmp_path, f"no-{name}", edit=lambda p, m, name=name: m.pop(name))
        fails(path, rf"{esc(str(path / 'manifest.json'))} lacks or garbles the field '{name}'")
    path = _saved(tmp_path, "garbled", edit=field(counts=6))
    fails(path, rf"{esc(str(path / 'manifest.json'))} lacks or garbles the field object of type 'int' has no len\(\)")

    inconsistent = [{"rows": 0}, {"heads": 0}, {"dim": -1}, {"capacity": 0}, {"rows": 1.0}, {"capacity": "6"},
                    {"counts": [6, 6], "written": [8, 8], "write_pointer": [2, 2]}, {"counts": [5]},
                    {"written": [9]}, {"write_pointer": [1]}, {"written": [-1], "counts": [-1], "write_pointer": [5]},
                    {"counts": [7]}]
    for i, changes in enumerate(inconsistent):
        path = _saved(tmp_path, f"inconsistent-{i}", edit=field(**changes))
        fails(path, rf"{esc(str(path / 'manifest.json'))} is inconsistent \(sizes, counts, written and write_pointer "
                    r"disagree\)")
    for changes in ({"counts": [2], "written": [2], "write_pointer": [2]},
                    {"counts": [6], "written": [6], "write_pointer": [0]}):  # consistent, and loads so
        path = _saved(tmp_path, f"consistent-{changes['written'][0]}", edit=field(**changes))
        assert load_store(path).written.tolist() == changes["written"]

    path = _saved(tmp_path, "unlisted", edit=lambda p, m: m["files"].pop("positions.safetensors"))
    fails(path, rf"{esc(str(path / 'manifest.json'))} lists no positions.safetensors")
    path = _saved(tmp_path, "unlisted-index", kind="faiss-ivf", edit=lambda p, m: m["files"].pop("indexes.safetensors"))
    fails(path, rf"{esc(str(path / 'manifest.json'))} lists no indexes.safetensors")
    path = _saved(tmp_path, "missing", edit=lambda p, m: (p / "values.safetensors").unlink())
    fails(path, rf"missing store file {esc(str(path / 'values.safetensors'))}")
    path = _saved(tmp_path, "dir", edit=lambda p, m: ((p / "keys.safetensors").unlink(), (p / "keys.safetensors").mkdir()))
    fails(path, rf"missing store file {esc(str(path / 'keys.safetensors'))}")
    corrupted = r"store file {} is corrupted or truncated \(its size or sha256 does not match manifest.json\)"
    path = _saved(tmp_path, "bytes", edit=lambda p, m: m["files"]["keys.safetensors"].update(
        bytes=m["files"]["keys.safetensors"]["bytes"] + 1))
    fails(path, corrupted.format(esc(str(path / "keys.safetensors"))))
    path = _saved(tmp_path, "sha", edit=lambda p, m: m["files"]["keys.safetensors"].update(sha256="0" * 64))
    fails(path, corrupted.format(esc(str(path / "keys.safetensors"))))
    path = _saved(tmp_path, "no-sha", edit=lambda p, m: m["files"]["values.safetensors"].pop("sha256"))
    fails(path, corrupted.format(esc(str(path / "values.safetensors"))))
    path = _saved(tmp_path, "garbage", edit=lambda p, m: _rewrite(p, m, "keys.safetensors", b"\x10" + b"\0" * 20))
    fails(path, rf"cannot read store file {esc(str(path / 'keys.safetensors'))}: .*")

    def replace(name, tensors):
        return lambda p, m: _rewrite(p, m, name, save_bytes(tensors))

    path = _saved(tmp_path, "shape", edit=replace("keys.safetensors", {"keys": torch.zeros(1, 1, 6, 5)}))
    fails(path, rf"store file {esc(str(path / 'keys.safetensors'))} holds keys of shape \(1, 1, 6, 5\), "
                r"the manifest says \(1, 1, 6, 4\)")
    path = _saved(tmp_path, "positions", edit=replace("positions.safetensors", {"positions": torch.zeros(1, 5)}))
    fails(path, rf"store file {esc(str(path / 'positions.safetensors'))} holds positions of shape \(1, 5\), "
                r"the manifest says \(1, 6\)")
    path = _saved(tmp_path, "renamed", edit=replace("values.safetensors", {"other": torch.zeros(1, 1, 6, 4)}))
    fails(path, rf"store file {esc(str(path / 'values.safetensors'))} holds values of shape nothing, "
                r"the manifest says \(1, 1, 6, 4\)")
    path = _saved(tmp_path, "dtype", edit=replace("keys.safetensors", {"keys": torch.zeros(1, 1, 6, 4, dtype=torch.float64)}))
    fails(path, rf"store file {esc(str(path / 'keys.safetensors'))} holds torch.float64, the manifest says float32")

    path = _saved(tmp_path, "kind", edit=field(kind="annoy"))
    fails(path, rf"{esc(str(path / 'manifest.json'))} describes a store that cannot be built: unknown kNN store kind "
                r"'annoy'.*")
    path = _saved(tmp_path, "option", edit=lambda p, m: m["options"].update(colour="red"))
    fails(path, rf"{esc(str(path / 'manifest.json'))} describes a store that cannot be built: .*colour.*")
    path = _saved(tmp_path, "blob", kind="faiss-hnsw", edit=replace(
        "indexes.safetensors", {"index.0.0": torch.arange(50, dtype=torch.uint8)}))
    fails(path, rf"{esc(str(path))}: cannot read the faiss index of row 0, head 0: .*")

    # shared: as saved unless overridden, and only for one row
    assert not load_store(good).shared and load_store(good, shared=True).shared
    shared = _saved(tmp_path, "shared", edit=field(shared=True))
    assert load_store(shared).shared and not load_store(shared, shared=False).shared
    two = _saved(tmp_path, "two", rows=2)
    assert load_store(two).rows == 2
    fails(two, rf"{esc(str(two / 'manifest.json'))}: only a one-row store can be shared, this one has 2 rows", shared=True)


def test_save_replaces_a_saved_store_or_fills_an_empty_directory_and_refuses_anything_else(tmp_path):
    store = make_store("exact", rows=1, heads=1, dim=4, capacity=6)
    fill(store, 3, 3)
    (tmp_path / "empty").mkdir()
    assert load_store(store.save(tmp_path / "empty")).written.tolist() == [3]
    fill(store, 2, 2, start=3)
    assert load_store(store.save(tmp_path / "empty")).written.tolist() == [5]  # a saved store is replaced
    (tmp_path / "file").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").mkdir()  # a directory named manifest.json is no saved store
    for name in ("file", "other", "fake"):
        with pytest.raises(StoreError, match=rf"^refusing to overwrite {re.escape(str(tmp_path / name))}: it exists "
                                             r"and holds no saved store$"):
            store.save(tmp_path / name)
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "fake" / "manifest.json").is_dir()


def test_with_knowledge_checks_its_stores_and_reads_everything_else_from_its_own():
    import copy

    from memlm.memory.knn.stores import WithKnowledge

    own = make_store("exact", rows=2, heads=2, dim=4, capacity=6)
    knowledge = make_store("exact", rows=1, heads=2, dim=4, capacity=6).share()
    shared_message = r"^WithKnowledge takes a per-row store and a shared knowledge store$"
    with pytest.raises(StoreError, match=shared_message):
        WithKnowledge(own, make_store("exact", rows=1, heads=2, dim=4, capacity=6))  # knowledge not shared
    with pytest.raises(StoreError, match=shared_message):
        WithKnowledge(knowledge, knowledge)  # own store shared
    for heads, dim in ((1, 4), (2, 8)):
        with pytest.raises(StoreError, match=rf"^knowledge store of {heads} heads x {dim} does not match the layer's "
                                             r"store of 2 heads x 4$"):
            WithKnowledge(own, make_store("exact", rows=1, heads=heads, dim=dim, capacity=6, shared=True))
    with pytest.raises(StoreError, match=r"^WithKnowledge mode must be one of fill, add, got 'mix'$"):
        WithKnowledge(own, knowledge, mode="mix")
    both = WithKnowledge(own, knowledge)
    assert both.mode == "fill" and both.own is own and both.knowledge is knowledge and not both.shared
    assert repr(both) == f"WithKnowledge({own!r}, {knowledge!r}, mode='fill')"
    assert (both.rows, both.heads, both.dim, both.capacity) == (2, 2, 4, 6) and both.counts is own.counts
    assert both.state_dict().keys() == own.state_dict().keys() and both.options() == own.options()
    with pytest.raises(AttributeError, match="'ExactStore' object has no attribute 'colour'"):
        both.colour
    twin = copy.copy(both)  # a copy is made without running __init__: no recursion through __getattr__
    assert twin.own is own and twin.knowledge is knowledge and twin.mode == "fill"
    bare = WithKnowledge.__new__(WithKnowledge)
    for name in ("own", "knowledge", "mode"):
        with pytest.raises(AttributeError, match=f"^{name}$"):
            getattr(bare, name)


def test_make_store_kinds():
    assert type(make_store("exact", 1, 1, 4, 4)) is ExactStore
    for kind, index in (("faiss", "flat"), ("faiss-flat", "flat"), ("faiss-ivf", "ivf"), ("faiss-hnsw", "hnsw")):
        store = make_store(kind, 1, 1, 4, 40)
        assert type(store) is FaissStore and store.index_kind == index and store.kind == "faiss"
    assert make_store("faiss", 1, 1, 4, 40, index="hnsw").index_kind == "hnsw"
    assert make_store("faiss-hnsw", 1, 1, 4, 40, index="ivf").index_kind == "hnsw"  # the kind's index wins
    assert make_store("exact", 1, 1, 4, 4, device="cpu", dtype=torch.float64).keys.dtype == torch.float64
    for kind in ("annoy", "faiss-pq", "faiss-", "faissivf", "exact-flat", "Exact"):
        with pytest.raises(ValueError, match=rf"^unknown kNN store kind {re.escape(repr(kind))}; choose one of exact, "
                                             r"faiss, faiss-flat, faiss-ivf, faiss-hnsw$"):
            make_store(kind, 1, 1, 4, 4)


def test_faiss_settings_defaults_and_refusals():
    import math

    for capacity in (1, 20, 100, 1600, 5000, 40000):
        nlist = max(1, min(math.isqrt(capacity), capacity // 39))  # the documented defaults
        for index in ("flat", "ivf", "hnsw"):
            store = make_store("faiss", 1, 1, 4, capacity, index=index)
            assert store.nlist == nlist and store.train_size == min(capacity, 39 * nlist) and store.nprobe is None
    assert make_store("faiss-ivf", 1, 1, 4, 100, nlist=5).train_size == 100
    assert make_store("faiss-ivf", 1, 1, 4, 1000, nlist=5).train_size == 195
    for train_size in (5, 100):  # both ends of [nlist, capacity]
        assert make_store("faiss-ivf", 1, 1, 4, 100, nlist=5, train_size=train_size).train_size == train_size
    for train_size in (4, 101):
        with pytest.raises(ValueError, match=rf"^ivf train_size must lie in \[nlist, capacity\] = \[5, 100\], "
                                             rf"got {train_size}$"):
            make_store("faiss-ivf", 1, 1, 4, 100, nlist=5, train_size=train_size)
    assert make_store("faiss-ivf", 1, 1, 4, 100, nprobe=1).nprobe == 1
    for nprobe in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match=rf"^ivf nprobe must be a positive int or None \(calibrated\), "
                                             rf"got {re.escape(repr(nprobe))}$"):
            make_store("faiss-ivf", 1, 1, 4, 100, nprobe=nprobe)
    with pytest.raises(ValueError, match=r"^unknown faiss index 'pq'; choose one of flat, ivf, hnsw$"):
        make_store("faiss", 1, 1, 4, 4, index="pq")
    assert make_store("faiss", 1, 1, 4, 4, dtype="float32").keys.dtype == torch.float32
    for dtype in (torch.float64, "bfloat16"):
        with pytest.raises(ValueError, match=rf"^a faiss store holds float32, got dtype {dtype}$"):
            make_store("faiss", 1, 1, 4, 4, dtype=dtype)
    assert make_store("faiss", 1, 1, 4, 4, device="meta").device == torch.device("cpu")  # always on the CPU
    assert make_store("faiss", 1, 1, 4, 4, shared=True).shared
    with pytest.raises(ValueError, match="exactly one row"):
        make_store("faiss", 2, 1, 4, 4, shared=True)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_faiss_indexes_train_hold_and_compact_exactly_as_documented(index):
    """Each index holds the entries written since its row's reset (ivf: from the moment it is
    trained, on the first train_size entries, all of them then), until the evicted ones number
    `capacity`: then only the live ones. Ids are entry numbers. Counted here step by step; every
    search meanwhile equals the reference (ivf probes every list)."""
    rows, heads, capacity, train_size = 2, 2, 6, 4
    store = make_store("faiss", rows=rows, heads=heads, dim=8, capacity=capacity, index=index, nlist=2, nprobe=2,
                       train_size=train_size, hnsw_m=4)
    ref = Reference(rows, heads, capacity)
    held = [0, 0]  # entries each row's indexes should hold
    written = [0, 0]
    trained = [index == "hnsw"] * 2
    q = unit(rows, 4, 3, 8)
    for step, (action, n) in enumerate([("write", 3), ("write", 1), ("write", 2), ("write", 5), ("write", 1),
                                        ("reset", 0), ("write", 4), ("write", 6), ("write", 13), ("write", 0),
                                        ("write", 2), ("reset", 1), ("write", 1), ("write", 3)]):
        if action == "reset":
            store.reset(torch.tensor([r == n for r in range(rows)]))
            ref.reset([n])
            written[n], held[n], trained[n] = 0, 0, index == "hnsw"
        else:
            keys = unit(rows, heads, n, 8)
            store.write(keys, 3 * keys, torch.arange(n) + 100 * step)
            ref.write(keys, 3 * keys, torch.arange(n) + 100 * step)
            for r in range(rows):
                written[r] += n
                count = min(written[r], capacity)
                if trained[r]:
                    held[r] += min(n, capacity)
                    if held[r] - count >= capacity:
                        held[r] = count
                elif count >= train_size:
                    trained[r], held[r] = True, count
        for r in range(rows):
            count = min(written[r], capacity)
            for h in range(heads):
                faiss_index = store.indexes[r][h]
                assert faiss_index.is_trained == trained[r] and faiss_index.ntotal == held[r], (step, r, h)
                if index == "hnsw" and held[r]:
                    import faiss
                    ids = faiss.vector_to_array(faiss_index.id_map)
                    assert sorted(ids.tolist()) == list(range(written[r] - held[r], written[r]))
                    assert held[r] >= count
        out, pos = store.search(q, 4, return_positions=True)
        assert_matches_reference(out, pos, ref, q, 4)


def test_faiss_search_uses_the_documented_nprobe_and_ef_search():
    """ivf: the index's nprobe (explicit here); hnsw: efSearch = max(ef_search, 2k); both over the
    live ids only. Checked against faiss's own search of the store's index, on data where the
    setting changes the answer."""
    import faiss

    torch.manual_seed(3)
    keys = unit(1, 1, 400, 8)
    q = unit(1, 1, 60, 8)
    x = q[0, 0].numpy()

    def direct(index, params, k):
        s, ids = index.search(x, k, params=params)
        return torch.from_numpy(ids), torch.from_numpy(s)

    ivf = make_store("faiss-ivf", 1, 1, 8, 300, nlist=16, nprobe=2, train_size=300)
    hnsw = make_store("faiss-hnsw", 1, 1, 8, 300, hnsw_m=2, ef_construction=8, ef_search=3)
    for store in (ivf, hnsw):
        for i in range(0, 400, 100):  # entries 100..399 live, 0..99 evicted but held
            store.write(keys[:, :, i:i + 100], 3 * keys[:, :, i:i + 100], torch.arange(i, i + 100))
        index = store.indexes[0][0]
        assert index.ntotal == 400
        for k in (1, 5, 10):
            out, pos = store.search(q, k, return_positions=True)
            sel = faiss.IDSelectorRange(100, 400)
            if store is ivf:
                make = lambda v: faiss.SearchParametersIVF(sel=sel, nprobe=v)  # noqa: E731
                want, other = 2, (1, 3, 16)
            else:
                make = lambda v: faiss.SearchParametersHNSW(sel=sel, efSearch=v)  # noqa: E731
                want, other = max(3, 2 * k), (2 * k + 8,)
            ids, scores = direct(index, make(want), k)
            found = ids >= 0
            assert torch.equal(pos[0, 0], torch.where(found, ids, -1)) and torch.equal(out.valid[0, 0], found)
            assert torch.equal(out.scores[0, 0], torch.where(found, scores, float("-inf")))
            for v in other:  # the setting matters on this data
                assert not torch.equal(direct(index, make(v), k)[0], ids), (store.index_kind, k, v)


def test_faiss_index_load_rebuilds_missing_indexes_and_refuses_ones_that_do_not_fit():
    """load_state_dict without the index blobs rebuilds each index from the ring buffer (an ivf
    one trained once it holds train_size live entries, exactly then too); a blob that faiss cannot
    read or that does not fit is refused, naming its row and head; an explicit nprobe overrides
    the saved one."""
    torch.manual_seed(4)
    q = unit(2, 2, 5, 8)
    for index, options in (("hnsw", {"hnsw_m": 4}), ("ivf", {"nlist": 2, "nprobe": 2, "train_size": 6})):
        store = make_store("faiss", rows=2, heads=2, dim=8, capacity=6, index=index, **options)
        ref = Reference(2, 2, 6)
        for n in (3, 5):  # row 0: 10 written in the end, row 1: 7 since its reset; 6 live in each (= train_size)
            keys = unit(2, 2, n, 8)
            store.write(keys, 3 * keys, torch.arange(n))
            ref.write(keys, 3 * keys, torch.arange(n))
            if n == 3:
                store.reset(torch.tensor([False, True]))
                ref.reset([1])
        keys = unit(2, 2, 2, 8)
        store.write(keys, 3 * keys, torch.arange(8, 10))
        ref.write(keys, 3 * keys, torch.arange(8, 10))
        state = {name: t for name, t in store.state_dict().items() if not name.startswith("index.")}
        assert sorted(set(store.state_dict()) - set(state)) == [f"index.{r}.{h}" for r in range(2) for h in range(2)]
        rebuilt = make_store("faiss", rows=2, heads=2, dim=8, capacity=6, index=index, **options)
        rebuilt.load_state_dict(state)
        for r, live in ((0, 6), (1, 6)):
            for h in range(2):
                assert rebuilt.indexes[r][h].ntotal == live and rebuilt.indexes[r][h].is_trained
        out, pos = rebuilt.search(q, 4, return_positions=True)
        assert_matches_reference(out, pos, ref, q, 4)

    # an ivf index not yet trained: rebuilt untrained while the row holds fewer than train_size
    store = make_store("faiss-ivf", rows=2, heads=1, dim=8, capacity=6, nlist=2, train_size=5)
    fill(store, 4, 4)
    rebuilt = make_store("faiss-ivf", rows=2, heads=1, dim=8, capacity=6, nlist=2, train_size=5)
    rebuilt.load_state_dict({name: t for name, t in store.state_dict().items() if not name.startswith("index.")})
    assert not any(i.is_trained or i.ntotal for row in rebuilt.indexes for i in row)
    loaded = make_store("faiss-ivf", rows=2, heads=1, dim=8, capacity=6, nlist=2, train_size=5)
    loaded.load_state_dict(store.state_dict())  # an untrained blob fits a row short of train_size
    assert not loaded.indexes[1][0].is_trained
    bigger = {**store.state_dict(), "counts": torch.tensor([5, 4]), "written": torch.tensor([5, 4])}
    with pytest.raises(StoreError, match=r"^the faiss index of row 0, head 0 does not fit this store$"):
        make_store("faiss-ivf", rows=2, heads=1, dim=8, capacity=6, nlist=2, train_size=5).load_state_dict(bigger)

    # a blob of another dimension, or none faiss can read
    other = make_store("faiss-hnsw", rows=2, heads=2, dim=4, capacity=6)
    hnsw = make_store("faiss-hnsw", rows=2, heads=2, dim=8, capacity=6)
    fill(hnsw, 3, 3)
    state = {**hnsw.state_dict(), "index.1.0": other.state_dict()["index.1.0"]}
    with pytest.raises(StoreError, match=r"^the faiss index of row 1, head 0 does not fit this store$"):
        make_store("faiss-hnsw", rows=2, heads=2, dim=8, capacity=6).load_state_dict(state)
    state = {**hnsw.state_dict(), "index.0.1": torch.arange(40, dtype=torch.uint8)}
    with pytest.raises(StoreError, match=r"^cannot read the faiss index of row 0, head 1: "):
        make_store("faiss-hnsw", rows=2, heads=2, dim=8, capacity=6).load_state_dict(state)

    # nprobe: the calibrated one travels with the index, an explicit one overrides it
    ivf = make_store("faiss-ivf", rows=1, heads=2, dim=8, capacity=100, nlist=8, train_size=100)
    fill(ivf, 100, 100)
    saved = [i.nprobe for i in ivf.indexes[0]]
    again = make_store("faiss-ivf", rows=1, heads=2, dim=8, capacity=100, nlist=8, train_size=100)
    again.load_state_dict(ivf.state_dict())
    assert [i.nprobe for i in again.indexes[0]] == saved
    forced = make_store("faiss-ivf", rows=1, heads=2, dim=8, capacity=100, nlist=8, train_size=100, nprobe=7)
    forced.load_state_dict(ivf.state_dict())
    assert [i.nprobe for i in forced.indexes[0]] == [7, 7] and 7 not in saved


@pytest.mark.parametrize("n,nlist", [(200, 8), (20, 4), (40, 2)])
def test_faiss_ivf_calibration_picks_the_smallest_nprobe_reaching_the_target_recall(n, nlist):
    """With at most 256 training keys every one of them is a query: its true top min(32, n - 1)
    among the other keys (float64 here) against the index's answer at each nprobe (its own
    entry left out); the calibrated nprobe is the smallest whose recall reaches 0.95."""
    import faiss

    torch.manual_seed(5)
    centers = torch.randn(6, 8)
    x = F.normalize(centers[torch.randint(6, (n,))] + 0.6 * torch.randn(n, 8), dim=-1)
    store = make_store("faiss-ivf", rows=1, heads=1, dim=8, capacity=n, nlist=nlist, train_size=n)
    store.write(x[None, None], x[None, None], torch.arange(n))
    index = store.indexes[0][0]
    assert index.is_trained and index.ntotal == n
    k = min(32, n - 1)
    scores = x.double() @ x.double().T
    scores.fill_diagonal_(float("-inf"))
    truth = scores.topk(k, dim=-1).indices.tolist()

    def recall(nprobe):
        _, found = index.search(x.numpy(), k + 1, params=faiss.SearchParametersIVF(nprobe=nprobe))
        hits = sum(len(set(t) & set([j for j in row.tolist() if j != i][:k])) for i, (t, row) in enumerate(zip(truth, found)))
        return hits / (n * k)

    recalls = [recall(p) for p in range(1, nlist + 1)]
    want = 1 + next(p for p, r in enumerate(recalls) if r >= 0.95)
    assert index.nprobe == want and store.nprobe is None
    assert 1 < want, recalls  # the data make calibration matter


@pytest.mark.parametrize("kind,options", SMALL + [("exact", {"dtype": torch.float64, "chunk_elements": 13})],
                         ids=SMALL_IDS + ["exact-float64-chunked"])
def test_a_shared_store_answers_every_batch_row_from_its_one_row(kind, options):
    """A shared store (one row, any batch): each batch row's queries against the one row's
    entries, as the reference says, while it holds fewer than k entries and after it wraps."""
    store = make_store(kind, rows=1, heads=2, dim=8, capacity=7, **options)
    dtype = store.keys.dtype
    ref = Reference(1, 2, 7)
    q = unit(3, 4, 2, 8).to(dtype)
    for n in (3, 9):
        keys, values = unit(1, 2, n, 8).to(dtype), torch.randn(1, 2, n, 8, dtype=dtype)
        store.write(keys, values, torch.arange(n) + 50)
        ref.write(keys, values, torch.arange(n) + 50)
        store.share()
        for k in (2, 5):
            out, pos = store.search(q, k, return_positions=True)
            assert_matches_reference(out, pos, ref, q, k, row_of=lambda b: 0)
            assert out.scores.dtype == dtype
        store.shared = False




def test_an_exact_store_is_built_on_the_device_asked_for_not_the_default():
    """make_store passes the caller's device on: a store asked for on 'meta' is there, and with the
    default device set to 'meta' a store asked for on the CPU is on the CPU."""
    assert make_store("exact", rows=1, heads=1, dim=4, capacity=8, device="meta").device.type == "meta"
    torch.set_default_device("meta")
    try:
        built = make_store("exact", rows=1, heads=1, dim=4, capacity=8, device="cpu")
    finally:
        torch.set_default_device(None)
    assert built.device.type == "cpu" and built.keys.device.type == "cpu"
