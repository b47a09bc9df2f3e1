"""`WithKnowledge`: a kNN layer's own store read together with a shared, read-only knowledge
store (memlm.memorize) as one memory. A departure from "Memorizing Transformers" (Wu et al.,
arXiv 2203.08913), which searches the document's own past only; see the class.
"""

from __future__ import annotations

import torch

from memlm.memory.knn.store import Retrieved, Store, StoreError

__all__ = ["WithKnowledge"]


class WithKnowledge:
    """A kNN layer's own per-row store plus a shared knowledge store (memlm.memorize), read as one
    memory. Writes, resets, the saved state and everything else are the own store's; the
    knowledge store stays read-only. How a search combines the two (`mode`):

    - fill (default): the own store's entries first, best first; knowledge entries, best first,
      fill the slots the own past leaves empty (at a document's start, in short documents). Once
      the own store holds k entries, the layer reads exactly what it read in training.
    - add: the top k of each, and the k best of the 2k by score. A large knowledge store then
      fills nearly every slot and crowds out the stream's own past.

    Departure: "Memorizing Transformers" (arXiv 2203.08913) searches the document's own past
    only; adding a corpus memorised beforehand (`memlm memorize`) is the programme's knowledge
    memory, and how to mix the two is our choice; BENCHMARKS.md compares the modes."""

    shared = False
    MODES = ("fill", "add")

    def __init__(self, own: Store, knowledge: Store, mode: str = "fill"):
        if own.shared or not knowledge.shared:
            raise StoreError("WithKnowledge takes a per-row store and a shared knowledge store")
        if (own.heads, own.dim) != (knowledge.heads, knowledge.dim):
            raise StoreError(f"knowledge store of {knowledge.heads} heads x {knowledge.dim} does not match the "
                             f"layer's store of {own.heads} heads x {own.dim}")
        if mode not in self.MODES:
            raise StoreError(f"WithKnowledge mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.own, self.knowledge, self.mode = own, knowledge, mode

    def __getattr__(self, name: str):  # rows, heads, counts, write, reset, state_dict, ...: the own store's
        if name in ("own", "knowledge", "mode"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.own, name)

    def __repr__(self) -> str:
        return f"WithKnowledge({self.own!r}, {self.knowledge!r}, mode={self.mode!r})"

    @torch.no_grad()
    def search(self, q: torch.Tensor, k: int, return_positions: bool = False, dtype: torch.dtype | None = None):
        """Store.search over both stores (positions: the own store's stream positions, the
        knowledge store's offsets in its memorised split)."""
        found = [store.search(q, k, return_positions) for store in (self.own, self.knowledge)]  # ranked in q's dtype
        parts = [f[0] for f in found] if return_positions else found
        own = parts[0]
        scores = torch.cat([p.scores for p in parts], dim=-1)  # (B, H, T, 2k): the own k, then the knowledge's
        slots = torch.arange(k, device=own.valid.device)  # (k,)
        if self.mode == "fill":  # slot j: the own entry j while there is one, then the knowledge's best
            held = own.valid.sum(dim=-1, keepdim=True)  # (B, H, T, 1) live own entries (valid ones come first)
            best = torch.where(slots < held, slots, k + (slots - held))  # (B, H, T, k) into the 2k candidates
        else:  # add: the k best of both by score
            best = scores.topk(k, dim=-1).indices  # (B, H, T, k)
        D = own.keys.shape[-1]
        pick = best[..., None].expand(*best.shape, D)
        dtype = dtype or q.dtype  # cast after the merge: a lower precision would tie and reorder scores
        out = Retrieved(torch.cat([p.keys for p in parts], dim=-2).gather(-2, pick).to(dtype),
                        torch.cat([p.values for p in parts], dim=-2).gather(-2, pick).to(dtype),
                        scores.gather(-1, best).to(dtype),
                        torch.cat([p.valid for p in parts], dim=-1).gather(-1, best))
        if not return_positions:
            return out
        return out, torch.cat([f[1] for f in found], dim=-1).gather(-1, best)

