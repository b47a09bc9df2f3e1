"""Memory for memlm: the per-layer state carried between segments, and the mechanisms that
read and write it (each a source of extra keys and values for a layer's attention)."""

from memlm.memory.state import State

__all__ = ["State"]
