"""`FaissStore`: the faiss-cpu backend of kNN memory. "Memorizing Transformers" (Wu et al., arXiv
2203.08913) searches approximately with ScaNN; faiss here, by name in `make_store`: "faiss" /
"faiss-flat", "faiss-ivf", "faiss-hnsw".

    flat: no index at all: faiss's brute-force `knn` (BLAS inner products + top-k) runs over
          the ring buffer's live slots [0, count) in place, so the keys are held once and a
          load rebuilds nothing. Exact; the id is the ring slot.
    ivf, hnsw: one index per row and head; the id is the entry number (monotonic since the
          row's reset; slot = id % capacity). The live ids are the contiguous range
          [written - count, written), which every search passes as an IDSelectorRange; evicted
          entries stay in the index, unseen, until it holds `capacity` of them, when it is
          compacted (ivf: remove_ids; hnsw, which cannot remove: rebuilt from the ring buffer).
          ivf is trained per row and head on the first `train_size` entries after each reset
          (until then it is searched exactly) and not retrained as the keys drift; its default
          nprobe is calibrated then (see FaissStore).

The ring buffer (keys, values, positions) is the store's record: retrieved keys and values
are looked up by slot, and a store is rebuilt, saved and checkpointed from it. ivf and hnsw
hold the keys a second time inside faiss (see FaissStore for why that copy stays).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from memlm.memory.knn.store import Store, StoreError

__all__ = ["FAISS_INDEXES", "FaissStore"]

FAISS_INDEXES = ("flat", "ivf", "hnsw")


class FaissStore(Store):
    """Top-k with faiss-cpu (ids: see the module docstring). The store lives on the CPU in
    float32; queries on another device are copied over and the results copied back.

    index: "flat" (exact, the default: faiss's brute-force `knn` over the ring buffer, no
    index), "ivf" (IndexIVFFlat, inner product) or "hnsw" (IndexHNSWFlat in an IndexIDMap2,
    inner product), one index per row and key/value head.
    ivf: nlist lists (default min(sqrt(capacity), capacity // 39)), trained on the first
    train_size entries (default min(capacity, 39 * nlist), faiss's minimum for a clean
    k-means); nprobe lists probed per query: None (the default) calibrates it per index when
    the index is trained: the smallest nprobe whose recall@32 (32 = memory.knn.k's default)
    against exact search reaches `CALIBRATION_RECALL` (0.95) with up to 256 of the training
    keys as queries (each one's own entry left out). Keys with cluster structure get a few
    probes (2-5 of 70-141 lists in tests/memory/test_stores.py's clustered data); uniform
    random keys, which IVF cannot partition, get about half the lists at dim 32 and three
    quarters at dim 128, where IVF saves little over flat (a fixed nlist // 4 gave recall@10
    0.79 at dim 32 and 0.66 at dim 64 on random data). The calibrated value is kept in the
    index (and in its saved bytes); an explicit nprobe is used as given. Model queries are not
    keys, so their recall may differ: pass nprobe to trade recall for speed.
    hnsw: hnsw_m links per node (32), ef_construction (80), ef_search (max(256, 2k) per search;
    128 gave recall@32 0.87 on 65536 random keys of dim 64, 256 gives 0.97).

    Why ivf and hnsw keep the keys twice (in faiss and in the ring buffer): faiss cannot index
    vectors it does not own, and the ring buffer cannot give way to the index: an ivf index
    holds nothing until it is trained (its first train_size entries live only in the ring),
    retrieved keys and values are gathered by slot in one tensor index (from an ivf index each
    key would need a direct map, a hash table per index, and a reconstruct per result), hnsw
    compaction rebuilds from the ring, and the ring is what `save` writes in the layout every
    backend reads. The cost is one more copy of the keys (not the values): 1.5x the memory of
    flat or exact. Flat, the default, holds them once.
    """

    kind = "faiss"
    CALIBRATION_RECALL = 0.95
    CALIBRATION_QUERIES = 256
    CALIBRATION_K = 32

    def __init__(self, rows: int, heads: int, dim: int, capacity: int, device: torch.device | str | None = None,
                 index: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                 train_size: int | None = None, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 256, dtype: torch.dtype | str = torch.float32, shared: bool = False):
        import faiss  # an optional dependency: imported when a faiss store is built

        self.faiss = faiss
        if index not in FAISS_INDEXES:
            raise ValueError(f"unknown faiss index {index!r}; choose one of {', '.join(FAISS_INDEXES)}")
        if dtype not in (torch.float32, "float32"):
            raise ValueError(f"a faiss store holds float32, got dtype {dtype}")
        super().__init__(rows, heads, dim, capacity, "cpu", torch.float32, shared)
        self.index_kind = index
        self.nlist = nlist or max(1, min(math.isqrt(capacity), capacity // 39))
        if nprobe is not None and (not isinstance(nprobe, int) or nprobe < 1):
            raise ValueError(f"ivf nprobe must be a positive int or None (calibrated), got {nprobe!r}")
        self.nprobe = nprobe  # None: calibrated per index when it is trained
        self.train_size = train_size or min(capacity, 39 * self.nlist)
        if self.train_size > capacity or self.train_size < self.nlist:
            raise ValueError(f"ivf train_size must lie in [nlist, capacity] = [{self.nlist}, {capacity}], "
                             f"got {self.train_size}")
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        # flat needs no index; ivf/hnsw: one per row and head
        self.indexes = None if index == "flat" else [[self._new_index() for _ in range(heads)] for _ in range(rows)]

    def options(self) -> dict:
        opts = {"index": self.index_kind}
        if self.index_kind == "ivf":
            opts.update(nlist=self.nlist, nprobe=self.nprobe, train_size=self.train_size)
        elif self.index_kind == "hnsw":
            opts.update(hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search)
        return opts

    def _new_index(self):
        faiss, D = self.faiss, self.dim
        if self.index_kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = self.nprobe or 1  # set for real once trained (calibrated when None)
            return index
        hnsw = faiss.IndexHNSWFlat(D, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        return faiss.IndexIDMap2(hnsw)

    def _live(self, r: int) -> tuple[int, int]:
        """Entry numbers [lo, hi) alive in row r."""
        hi = int(self.written[r])
        return hi - int(self.counts[r]), hi

    def _live_keys(self, r: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._live(r)
        ids = np.arange(lo, hi, dtype=np.int64)
        return np.ascontiguousarray(self.keys[r, h].numpy()[ids % self.capacity]), ids

    def _index_write(self, keys: torch.Tensor, first: torch.Tensor) -> None:
        if self.indexes is None:  # flat: the ring buffer is all there is
            return
        for r in range(self.rows):
            ids = int(first[r]) + np.arange(keys.shape[2], dtype=np.int64)  # (n,) entry numbers
            for h in range(self.heads):
                index = self.indexes[r][h]
                if self.index_kind == "hnsw" or index.is_trained:
                    index.add_with_ids(np.ascontiguousarray(keys[r, h].numpy(), dtype=np.float32), ids)

    def _after_write(self) -> None:
        if self.indexes is None:
            return
        for r in range(self.rows):
            lo, _ = self._live(r)
            for h in range(self.heads):
                index = self.indexes[r][h]
                if self.index_kind == "ivf" and not index.is_trained and int(self.counts[r]) >= self.train_size:
                    self._train(index, *self._live_keys(r, h))
                elif index.ntotal - int(self.counts[r]) >= self.capacity:
                    self._compact(r, h, lo)

    def _train(self, index, x: np.ndarray, ids: np.ndarray) -> None:
        """Train an ivf index on x (n, D), add x with its ids and set its nprobe."""
        index.train(x)
        index.add_with_ids(x, ids)
        index.nprobe = self.nprobe or self._calibrated_nprobe(index, x, ids)

    def _calibrated_nprobe(self, index, x: np.ndarray, ids: np.ndarray) -> int:
        """The smallest nprobe whose recall@k against exact search reaches CALIBRATION_RECALL,
        with up to CALIBRATION_QUERIES of the keys x (n, D) (ids (n,)) as queries, each query's
        own entry left out. Recall grows with nprobe (more lists probed, a superset of
        candidates), so a binary search finds it."""
        faiss, n = self.faiss, len(x)
        k = min(self.CALIBRATION_K, n - 1)
        if k < 1 or self.nlist == 1:
            return self.nlist
        pick = np.unique(np.linspace(0, n - 1, min(n, self.CALIBRATION_QUERIES)).astype(np.int64))
        queries, own = np.ascontiguousarray(x[pick]), ids[pick]
        _, exact = faiss.knn(queries, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)  # positions in x
        truth = [[j for j in ids[row[row >= 0]] if j != me][:k] for row, me in zip(exact, own)]

        def recall(nprobe: int) -> float:
            _, found = index.search(queries, k + 1, params=faiss.SearchParametersIVF(nprobe=nprobe))
            hits = sum(len(set(t) & set(row[row != me][:k].tolist())) for t, row, me in zip(truth, found, own))
            return hits / max(1, sum(len(t) for t in truth))

        lo, hi = 1, self.nlist  # recall(nlist) is exact
        while lo < hi:
            mid = (lo + hi) // 2
            if recall(mid) >= self.CALIBRATION_RECALL:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _compact(self, r: int, h: int, lo: int) -> None:
        """Drop the evicted entries (ids below lo) that an ivf/hnsw index still holds."""
        if self.index_kind == "ivf":
            self.indexes[r][h].remove_ids(self.faiss.IDSelectorRange(0, lo))
        else:
            self.indexes[r][h] = self._rebuilt(r, h)

    def _rebuilt(self, r: int, h: int):
        """A fresh ivf/hnsw index of row r, head h holding exactly its live entries."""
        index = self._new_index()
        x, ids = self._live_keys(r, h)
        if self.index_kind == "hnsw":
            index.add_with_ids(x, ids)
        elif len(ids) >= self.train_size:
            self._train(index, x, ids)
        return index

    def _index_reset(self, mask: torch.Tensor) -> None:
        if self.indexes is None:  # flat: counts are all a search reads
            return
        for r in mask.nonzero().flatten().tolist():
            for h in range(self.heads):  # ivf: a new one, so it is trained on the new document's keys
                self.indexes[r][h] = self._new_index()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.indexes is not None:  # flat has no index to save
            for r in range(self.rows):
                for h in range(self.heads):
                    state[f"index.{r}.{h}"] = torch.from_numpy(self.faiss.serialize_index(self.indexes[r][h]))
        return state

    def _index_load(self, state: dict[str, torch.Tensor]) -> None:
        if self.indexes is None:  # flat: the restored ring buffer is the whole store, nothing to rebuild
            return
        for r in range(self.rows):
            for h in range(self.heads):
                blob = state.get(f"index.{r}.{h}")
                if blob is None:
                    self.indexes[r][h] = self._rebuilt(r, h)
                    continue
                try:
                    index = self.faiss.deserialize_index(np.ascontiguousarray(blob.cpu().numpy(), dtype=np.uint8))
                except RuntimeError as e:
                    raise StoreError(f"cannot read the faiss index of row {r}, head {h}: "
                                     f"{str(e).splitlines()[0]}") from None
                lo, hi = self._live(r)
                if index.d != self.dim or (self.index_kind == "ivf" and not index.is_trained
                                           and hi - lo >= self.train_size):
                    raise StoreError(f"the faiss index of row {r}, head {h} does not fit this store")
                if self.index_kind == "ivf" and self.nprobe is not None:
                    index.nprobe = self.nprobe  # else the calibrated value saved with the index
                self.indexes[r][h] = index

    def _topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss, C = self.faiss, self.capacity
        B, Hkv, N, D = x.shape
        x = x.to("cpu", torch.float32).numpy()
        scores = np.full((B, Hkv, N, k), -np.inf, dtype=np.float32)
        slots = np.full((B, Hkv, N, k), -1, dtype=np.int64)
        for r in range(self.rows):
            lo, hi = self._live(r)
            if hi == lo:
                continue
            batch = slice(None) if self.shared else slice(r, r + 1)  # a shared row serves every batch row
            for h in range(Hkv):
                queries = np.ascontiguousarray(x[batch, h].reshape(-1, D))  # (B' * N, D)
                index = self.indexes[r][h] if self.indexes is not None else None
                if index is None or self.index_kind == "ivf" and not index.is_trained:
                    # exact over the live slots 0..count-1 of the ring buffer, read in place
                    s, ids = faiss.knn(queries, self.keys[r, h, :hi - lo].numpy(), k,
                                       metric=faiss.METRIC_INNER_PRODUCT)
                else:
                    if self.index_kind == "ivf":
                        params = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(lo, hi), nprobe=index.nprobe)
                    else:
                        params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorRange(lo, hi),
                                                            efSearch=max(self.ef_search, 2 * k))
                    s, ids = index.search(queries, k, params=params)  # (B' * N, k); params holds sel alive
                found = ids >= 0
                scores[batch, h] = np.where(found, s, -np.inf).reshape(-1, N, k)
                slots[batch, h] = np.where(found, ids % C, -1).reshape(-1, N, k)
        return torch.from_numpy(scores), torch.from_numpy(slots)

