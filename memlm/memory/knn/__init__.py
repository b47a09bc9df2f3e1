"""kNN memory (Memorizing Transformers, arXiv 2203.08913): the retrieval attention, the external
stores it searches (store: the interface; exact, faiss_store: the backends; knowledge: a shared
knowledge store read with a layer's own; persistence: saving and reading; stores: building one
by name or from disk), and the fused top-k search kernels."""

from memlm.memory.knn.attention import KnnAttention, write_segment
from memlm.memory.knn.knowledge import WithKnowledge
from memlm.memory.knn.store import Store, StoreError
from memlm.memory.knn.stores import load_store, make_store

__all__ = ["KnnAttention", "write_segment", "Store", "StoreError", "WithKnowledge", "load_store", "make_store"]
