"""`ExactStore`: the exact kNN backend of "Memorizing Transformers" (Wu et al., arXiv
2203.08913) on the store's own device. Search is a batched matmul + torch.topk in chunks, or,
on a GPU with Triton, the fused top-k search of memlm.memory.knn.fused_topk, which never builds
the score matrix; "exact" in `make_store`.
"""

from __future__ import annotations

import torch

from memlm.memory.knn.store import Store

__all__ = ["ExactStore"]


def _fused_topk():
    """memlm.memory.knn.fused_topk, imported on first use on a GPU (it imports triton)."""
    from memlm.memory.knn import fused_topk
    return fused_topk


def capturing_graph(device: torch.device) -> bool:
    """Whether work on `device` is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class ExactStore(Store):
    """Exact top-k by batched matmul + torch.topk on the store's device.

    Scores are computed in chunks of at most `chunk_elements` (whole (row, kv head) groups of
    queries x capacity, so each key is read once unless one group alone is larger), which bounds
    the memory of a search; `dtype` (float32 by default; bf16 halves memory on a GPU) is the
    storage and scoring precision. A shared store folds the batch into the queries, so its
    keys are read once for all rows.

    On a GPU with Triton (`fused`, the default) the search never builds the score matrix: a
    fused kernel keeps only tile maxima and the best tiles are rescored exactly
    (memlm.memory.knn.fused_topk); the chunked matmul above is the reference it is tested against.
    """

    kind = "exact"

    def __init__(self, rows: int, heads: int, dim: int, capacity: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | str = torch.float32, chunk_elements: int = 2 ** 27, shared: bool = False,
                 fused: bool = True):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        super().__init__(rows, heads, dim, capacity, device, dtype, shared)
        self.chunk_elements = chunk_elements
        self.fused = fused
        # decided (and the operator registered, by importing fused_topk) here, outside any compiled code
        self.fused_ready = self.device.type == "cuda" and _fused_topk().available(self.device)

    def options(self) -> dict:
        return {"chunk_elements": self.chunk_elements, "fused": self.fused}

    def _topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hkv, N, D = x.shape
        # slots past `filled` were never written in any row; compiled code searches them all
        # (masked by counts) rather than read the Python bound, whose changes would recompile it,
        # and so does a search captured in a CUDA graph, which later writes do not capture again
        C = self.capacity if torch.compiler.is_compiling() or capturing_graph(self.device) else self.filled
        if C == 0:  # nothing written yet: nothing to score
            empty = torch.full((B, Hkv, N, k), -1, dtype=torch.long, device=self.device)
            return torch.full((B, Hkv, N, k), float("-inf"), dtype=self.dtype, device=self.device), empty
        kk = min(k, C)
        x = x.to(self.device, self.dtype)
        if self.shared:  # one memory for every batch row: fold the batch into the queries
            x = x.transpose(0, 1).reshape(1, Hkv, B * N, D)
        R, M = x.shape[0], x.shape[2]
        x = x.reshape(R * Hkv, M, D)  # (R*Hkv, M, D): one group per row and kv head
        keys = self.keys.view(R * Hkv, self.capacity, D)[:, :C]
        counts = self.counts.repeat_interleave(Hkv)  # (R*Hkv,)
        if self.fused and self.fused_ready:  # (R*Hkv, M, kk); -1 / -inf done; one opaque op under torch.compile
            scores, slots = torch.ops.memlm.fused_inner_product_topk(x, keys, counts, kk)
        else:
            scores, slots = self._chunked_topk(x, keys, counts, kk)
        scores, slots = scores.view(R, Hkv, M, kk), slots.view(R, Hkv, M, kk)
        if self.shared:
            scores = scores.view(Hkv, B, N, kk).transpose(0, 1)
            slots = slots.view(Hkv, B, N, kk).transpose(0, 1)
        if kk < k:  # asked for more than the capacity: pad
            scores = torch.nn.functional.pad(scores, (0, k - kk), value=float("-inf"))
            slots = torch.nn.functional.pad(slots, (0, k - kk), value=-1)
        return scores, slots

    def _chunked_topk(self, x: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor,
                      kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Brute force: x (G, M, D) against keys (G, C, D) -> best kk (G, M, kk) scores and slots."""
        G, M, _ = x.shape
        C = keys.shape[1]
        dead = torch.arange(C, device=self.device) >= counts[:, None]  # (G, C) slots not written
        scores = torch.empty(G, M, kk, dtype=self.dtype, device=self.device)
        slots = torch.empty(G, M, kk, dtype=torch.long, device=self.device)
        # chunks of whole groups, so each group's keys are read once; a group's queries are
        # split only when one group alone exceeds chunk_elements
        groups = max(1, self.chunk_elements // (M * C))
        queries = M if M * C <= self.chunk_elements else max(1, self.chunk_elements // C)
        for g in range(0, G, groups):
            for n in range(0, M, queries):
                s = torch.bmm(x[g:g + groups, n:n + queries], keys[g:g + groups].transpose(1, 2))  # (g, n, C)
                s.masked_fill_(dead[g:g + groups, None, :], float("-inf"))
                top = s.topk(kk, dim=-1)  # (g, n, kk), best first
                scores[g:g + groups, n:n + queries], slots[g:g + groups, n:n + queries] = top.values, top.indices
        found = torch.arange(kk, device=self.device) < counts[:, None, None]  # (G, 1, kk): rank < count
        slots.masked_fill_(~found, -1)
        return scores, slots

