"""kNN memory (Memorizing Transformers, arXiv 2203.08913): the retrieval attention, the external
stores it searches, and the fused top-k search kernels."""

from memlm.memory.knn.attention import KnnAttention, write_segment
from memlm.memory.knn.stores import Store, StoreError, WithKnowledge, load_store, make_store

__all__ = ["KnnAttention", "write_segment", "Store", "StoreError", "WithKnowledge", "load_store", "make_store"]
