"""Building kNN stores ("Memorizing Transformers", Wu et al., arXiv 2203.08913): by name
(`make_store`) or from a directory written by `Store.save` (`load_store`). This module also
names the whole store family in one place, for callers that import them from here.

Backends, same interface (memlm.memory.knn.store), chosen by name in `make_store`:
- `ExactStore` ("exact", memlm.memory.knn.exact): tensors on the model's device, batched
  matmul + torch.topk (on a GPU the fused Triton search), exact; the fast path on a GPU up to a
  few hundred thousand entries per row.
- `FaissStore` ("faiss", "faiss-flat", "faiss-ivf", "faiss-hnsw", memlm.memory.knn.faiss_store):
  faiss-cpu (paper: approximate search with ScaNN; faiss here): flat (exact, no index), ivf or
  hnsw.
`WithKnowledge` (memlm.memory.knn.knowledge) reads a layer's store together with a shared
knowledge store.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memlm.memory.knn.exact import ExactStore
from memlm.memory.knn.faiss_store import FAISS_INDEXES, FaissStore
from memlm.memory.knn.knowledge import WithKnowledge
from memlm.memory.knn.persistence import MANIFEST, read_saved
from memlm.memory.knn.store import Retrieved, Store, StoreError

__all__ = ["ExactStore", "FaissStore", "Retrieved", "Store", "StoreError", "WithKnowledge", "load_store",
           "make_store"]

KINDS = ("exact", "faiss", "faiss-flat", "faiss-ivf", "faiss-hnsw")


def make_store(kind: str, rows: int, heads: int, dim: int, capacity: int,
               device: torch.device | str | None = None, **options) -> Store:
    """A store by name: "exact" (ExactStore) or "faiss" (FaissStore; `index="flat" | "ivf" |
    "hnsw"`, also spelled "faiss-flat", "faiss-ivf", "faiss-hnsw"). `options` go to the
    backend (e.g. dtype, chunk_elements, nlist, nprobe, ef_search, shared)."""
    if kind == "exact":
        return ExactStore(rows, heads, dim, capacity, device, **options)
    if kind == "faiss" or kind.startswith("faiss-") and kind[6:] in FAISS_INDEXES:
        if kind != "faiss":
            options = {**options, "index": kind[6:]}
        return FaissStore(rows, heads, dim, capacity, device, **options)
    raise ValueError(f"unknown kNN store kind {kind!r}; choose one of {', '.join(KINDS)}")


def load_store(directory: str | Path, device: torch.device | str | None = None, shared: bool | None = None,
               **expected) -> Store:
    """Read a store written by `Store.save`, verifying the manifest, every file's checksum and
    every tensor's shape; `expected` (e.g. kind="faiss", heads=2, dim=64) must match the
    manifest. `shared` overrides the saved flag. Raises StoreError naming the bad file."""
    directory = Path(directory)
    path = directory / MANIFEST
    manifest, state = read_saved(directory, **expected)
    kind, rows, heads, dim, capacity = (manifest[k] for k in ("kind", "rows", "heads", "dim", "capacity"))
    options, dtype = dict(manifest["options"]), manifest["dtype"]
    try:
        store = make_store(kind, rows, heads, dim, capacity, device, **options,
                           **({"dtype": getattr(torch, dtype)} if kind == "exact" else {}))
        store.load_state_dict(state)
    except (ValueError, TypeError, AttributeError) as e:
        raise StoreError(f"{path} describes a store that cannot be built: {e}") from None
    except StoreError as e:
        raise StoreError(f"{directory}: {e}") from None
    store.shared = manifest["shared"] if shared is None else shared
    if store.shared and store.rows != 1:
        raise StoreError(f"{path}: only a one-row store can be shared, this one has {store.rows} rows")
    return store
