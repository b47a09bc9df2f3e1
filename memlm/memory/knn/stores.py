"""External key/value stores for kNN memory: "Memorizing Transformers" (Wu et al., arXiv
2203.08913), with the read/write framing of "Neural Turing Machines" (Graves et al., arXiv
1410.5401): a layer *writes* its past (key, value) pairs to an external memory and *reads*
by content, here the top-k keys by inner product with each query.

One store per kNN layer. It holds `rows` independent memories (one per batch row, i.e. per
stream) and, within a row, one memory per key/value head:

    keys      (rows, heads, capacity, dim)   ring buffer, slot = (entry number) % capacity
    values    (rows, heads, capacity, dim)
    positions (rows, capacity)               absolute stream position of each entry (-1: empty)
    counts    (rows,)                        entries held, min(written, capacity)
    written   (rows,)                        entries written since the row's last reset; the
                                             next write goes to slot written % capacity

Writes append per row and evict the oldest entries beyond `capacity` (first in, first out,
as the paper's fixed-size memory); a write costs O(T), never a copy of the buffer. Stale
slots (after `reset`) are never read: a row's live slots are [0, count) until it wraps.

Search is by inner product: the caller L2-normalises keys and queries (as the paper does),
so the scores are cosine similarities; the store itself does not normalise. A query tensor
q (B, H, T, D) with H a multiple of the store's heads Hkv (grouped or multi-query heads,
Hkv = 1) searches, for query head h, the memory of key/value head h // (H // Hkv), the
convention of `repeat_interleave` in memlm.nn.kernels.

Backends, same interface, chosen by name in `make_store`:
- `ExactStore` ("exact"): tensors on the model's device, batched matmul + torch.topk,
  exact; the fast path on a GPU up to a few hundred thousand entries per row.
- `FaissStore` ("faiss", "faiss-flat", "faiss-ivf", "faiss-hnsw"): faiss-cpu (paper:
  approximate search with ScaNN; faiss here).
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

Shared read-only stores (knowledge memory): one "row" that every batch row reads
(`store.share()`, `make_store(..., shared=True)` or `load_store(..., shared=True)`);
`write`, `reset` and `clear` raise StoreError.

Persistence: `store.save(directory)` writes, atomically (temporary directory + rename),

    manifest.json          format, version, kind, rows, heads, dim, capacity, dtype, shared,
                           options, counts, written, write_pointer, sha256 and size of each file
    keys.safetensors       {"keys": (rows, heads, capacity, dim)}
    values.safetensors     {"values": ...}
    positions.safetensors  {"positions": (rows, capacity) int64}
    indexes.safetensors    faiss ivf/hnsw only: {"index.<row>.<head>": serialized faiss index
                           (uint8)}, so a load rebuilds no graph and retrains nothing (flat
                           has no index: loading it is a copy of the tensors)

and `load_store(directory, device)` verifies checksums, shapes and the manifest, raising
StoreError naming the offending file. `state_dict()` holds the same tensors (plus counts and
written) for training checkpoints; `load_state_dict` restores them into a store built with the
same settings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import torch

from memlm.fileio import sha256_file, write_dir_atomically

__all__ = ["ExactStore", "FaissStore", "Retrieved", "Store", "StoreError", "load_store", "make_store"]

FORMAT, VERSION = "memlm.knn-store", 1
MANIFEST = "manifest.json"
KEYS, VALUES, POSITIONS, INDEXES = "keys.safetensors", "values.safetensors", "positions.safetensors", \
    "indexes.safetensors"
FAISS_INDEXES = ("flat", "ivf", "hnsw")
KINDS = ("exact", "faiss", "faiss-flat", "faiss-ivf", "faiss-hnsw")


class StoreError(Exception):
    """A store that cannot be read, written or restored: an unreadable or inconsistent saved
    store (the message names the file), a state that does not fit, or a write to a read-only
    shared store."""


class Retrieved(NamedTuple):
    """What `search(q, k)` returns; unpacks as `keys, values, scores, valid`."""

    keys: torch.Tensor
    """(B, H, T, k, D) retrieved keys, best first; zeros where not valid."""
    values: torch.Tensor
    """(B, H, T, k, D) their values; zeros where not valid."""
    scores: torch.Tensor
    """(B, H, T, k) inner products q . key; -inf where not valid."""
    valid: torch.Tensor
    """(B, H, T, k) bool: False where the row holds fewer than k entries (or, for an
    approximate index, found fewer)."""


class Store:
    """Interface and shared bookkeeping of the backends (see the module docstring)."""

    kind: str = ""

    def __init__(self, rows: int, heads: int, dim: int, capacity: int, device: torch.device | str | None,
                 dtype: torch.dtype, shared: bool):
        for name, value in (("rows", rows), ("heads", heads), ("dim", dim), ("capacity", capacity)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"store {name} must be a positive int, got {value!r}")
        if shared and rows != 1:
            raise ValueError(f"a shared store has exactly one row, got rows={rows}")
        self.rows, self.heads, self.dim, self.capacity = rows, heads, dim, capacity
        self.dtype, self.shared = dtype, shared
        self.keys = torch.zeros(rows, heads, capacity, dim, dtype=dtype,
                                device="cpu" if device is None else device)  # (R, Hkv, C, D)
        # the tensors' own device: "cuda" becomes "cuda:0", so that a store made with either name
        # passes the same torch.compile guards (a race warm-up's stores on "cuda" against the
        # trainer's on "cuda:0" recompiled the whole forward after the clock had started)
        self.device = self.keys.device
        self.values = torch.zeros_like(self.keys)                                               # (R, Hkv, C, D)
        self.positions = torch.full((rows, capacity), -1, dtype=torch.long, device=self.device)  # (R, C)
        self.counts = torch.zeros(rows, dtype=torch.long, device=self.device)                    # (R,)
        self.written = torch.zeros(rows, dtype=torch.long, device=self.device)                   # (R,)
        self.filled = 0  # a Python bound on the slots written in any row (no device sync to read it)

    # ----- interface ------------------------------------------------------------------
    def options(self) -> dict:
        """Backend settings that `make_store` takes back (recorded in the manifest)."""
        return {}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return (f"{type(self).__name__}(rows={self.rows}, heads={self.heads}, dim={self.dim}, "
                f"capacity={self.capacity}{opts}{', shared' if self.shared else ''})")

    def share(self) -> "Store":
        """Make this one-row store a shared read-only memory that every batch row reads."""
        if self.rows != 1:
            raise StoreError(f"only a one-row store can be shared, this one has {self.rows} rows")
        self.shared = True
        return self

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append keys, values (B, Hkv, T, D) at stream positions (T,) or (B, T) to each row,
        evicting the oldest entries beyond capacity. Detached copies are stored."""
        self._writable("write")
        B, Hkv, T, D = keys.shape
        if (B, Hkv, D) != (self.rows, self.heads, self.dim) or values.shape != keys.shape:
            raise ValueError(f"write expects keys and values of shape ({self.rows}, {self.heads}, T, {self.dim}), "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        positions = torch.as_tensor(positions, device=self.device)
        if positions.shape not in ((T,), (B, T)):
            raise ValueError(f"write expects positions of shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
        if T == 0:
            return
        n = min(T, self.capacity)  # a write longer than the memory keeps only its last `capacity`
        keys = keys[:, :, T - n:].detach().to(self.device, self.dtype)
        values = values[:, :, T - n:].detach().to(self.device, self.dtype)
        positions = positions.expand(B, T)[:, T - n:].to(torch.long)  # (B, n)
        first = self.written + (T - n)  # (B,) entry number of the first kept entry
        self._index_write(keys, first)  # before the bookkeeping: backends see the old counts
        slots = (first[:, None] + torch.arange(n, device=self.device)) % self.capacity  # (B, n), distinct
        rows = torch.arange(B, device=self.device)[:, None]  # (B, 1)
        self.keys[rows, :, slots] = keys.transpose(1, 2)  # advanced indices first: (B, n, Hkv, D)
        self.values[rows, :, slots] = values.transpose(1, 2)
        self.positions[rows, slots] = positions
        self.written += T
        self.counts = self.written.clamp(max=self.capacity)
        # under torch.compile the bound is set, never read: a value that grows every step while the
        # store fills would be a new constant, so a recompilation, at every step (the compiled
        # search covers every slot instead, masked by counts)
        self.filled = self.capacity if torch.compiler.is_compiling() else min(self.capacity, self.filled + T)
        self._after_write()

    @torch.no_grad()
    def search(self, q: torch.Tensor, k: int, return_positions: bool = False, dtype: torch.dtype | None = None):
        """Top-k entries by inner product for each query q (B, H, T, D) among its row's entries
        of its key/value head's memory. Returns Retrieved(keys, values, scores, valid), and with
        return_positions=True the pair (retrieved, positions (B, H, T, k) int64, -1 where not
        valid). Results are on q's device, keys/values/scores in `dtype` (default q's: a layer
        searching with float32 unit queries asks for its compute dtype, which spares a float32
        copy of every retrieved key and value)."""
        dtype = dtype or q.dtype
        B, H, T, D = q.shape
        if D != self.dim or H % self.heads:
            raise ValueError(f"search expects queries (B, H, T, {self.dim}) with H a multiple of the store's "
                             f"{self.heads} heads, got {tuple(q.shape)}")
        if not self.shared and B != self.rows:
            raise ValueError(f"search expects {self.rows} rows (one per stream), got {B}; a shared store "
                             f"(store.share()) serves any batch")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"search expects a positive int k, got {k!r}")
        G, Hkv = H // self.heads, self.heads
        x = q.detach().reshape(B, Hkv, G * T, D)  # query head h*G + g reads kv head h
        scores, slots = self._topk(x, k)  # (B, Hkv, G*T, k) each on self.device; slots -1 where not valid
        valid = slots >= 0
        row = torch.zeros(B, dtype=torch.long, device=slots.device) if self.shared else \
            torch.arange(B, device=slots.device)  # (B,) the store row each batch row reads
        index = ((row[:, None] * Hkv + torch.arange(Hkv, device=slots.device)) * self.capacity)[:, :, None, None] \
            + slots.clamp(min=0)  # (B, Hkv, G*T, k) into the flattened (R*Hkv*C) entries
        keys = self.keys.view(-1, D)[index].masked_fill_(~valid[..., None], 0)  # (B, Hkv, G*T, k, D)
        values = self.values.view(-1, D)[index].masked_fill_(~valid[..., None], 0)
        scores = scores.masked_fill(~valid, float("-inf"))
        out = Retrieved(keys.to(q.device, dtype).reshape(B, H, T, k, D),
                        values.to(q.device, dtype).reshape(B, H, T, k, D),
                        scores.to(q.device, dtype).reshape(B, H, T, k), valid.to(q.device).reshape(B, H, T, k))
        if not return_positions:
            return out
        positions = self.positions[row[:, None, None, None], slots.clamp(min=0)].masked_fill_(~valid, -1)
        return out, positions.to(q.device).reshape(B, H, T, k)

    @torch.no_grad()
    def reset(self, mask: torch.Tensor) -> None:
        """Clear the rows where mask (B,) is True (they start a new document)."""
        self._writable("reset")
        if mask.shape != (self.rows,):
            raise ValueError(f"reset mask must have shape ({self.rows},), got {tuple(mask.shape)}")
        mask = mask.to(self.device, torch.bool)
        self.written.masked_fill_(mask, 0)
        self.counts = self.written.clamp(max=self.capacity)
        self.positions.masked_fill_(mask[:, None], -1)  # keys/values of cleared rows are stale, never read
        self._index_reset(mask)

    def clear(self) -> None:
        """Clear every row."""
        self.reset(torch.ones(self.rows, dtype=torch.bool))

    def entries(self, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A row's entries oldest first, for debugging and tests: keys, values (Hkv, n, D) and
        positions (n,)."""
        count, written = int(self.counts[row]), int(self.written[row])
        slots = torch.arange(written - count, written, device=self.device) % self.capacity
        return self.keys[row][:, slots], self.values[row][:, slots], self.positions[row][slots]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The store's tensors, for a training checkpoint (the files of `save` hold the same)."""
        return {"keys": self.keys, "values": self.values, "positions": self.positions,
                "counts": self.counts, "written": self.written}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()` output of a store with the same rows, heads, dim and capacity."""
        R, Hkv, C, D = self.rows, self.heads, self.capacity, self.dim
        expected = {"keys": (R, Hkv, C, D), "values": (R, Hkv, C, D), "positions": (R, C), "counts": (R,),
                    "written": (R,)}
        for name, shape in expected.items():
            if name not in state:
                raise StoreError(f"store state lacks {name!r}")
            if tuple(state[name].shape) != shape:
                raise StoreError(f"store state {name!r} has shape {tuple(state[name].shape)}, this store "
                                 f"needs {shape} (rows, heads, capacity, dim = {R}, {Hkv}, {C}, {D})")
        written = state["written"].to(self.device, torch.long)
        if bool((written < 0).any()) or not torch.equal(state["counts"].to(self.device, torch.long),
                                                        written.clamp(max=C)):
            raise StoreError("store state is inconsistent: counts must equal min(written, capacity)")
        self.keys.copy_(state["keys"])
        self.values.copy_(state["values"])
        self.positions.copy_(state["positions"])
        self.written = written.clone()
        self.counts = written.clamp(max=C)
        self.filled = int(self.counts.max()) if self.rows else 0
        self._index_load(state)

    def save(self, directory: str | Path) -> Path:
        """Write the store to `directory` atomically (see the module docstring); returns it."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        files = {KEYS: {"keys": tensors["keys"]}, VALUES: {"values": tensors["values"]},
                 POSITIONS: {"positions": tensors["positions"]}}
        indexes = {k: v for k, v in tensors.items() if k.startswith("index.")}
        if indexes:
            files[INDEXES] = indexes
        written = tensors["written"].tolist()
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "rows": self.rows,
                    "heads": self.heads, "dim": self.dim, "capacity": self.capacity,
                    "dtype": str(self.dtype).removeprefix("torch."), "shared": self.shared,
                    "options": self.options(), "counts": tensors["counts"].tolist(), "written": written,
                    "write_pointer": [w % self.capacity for w in written]}
        return _save_atomic(Path(directory), files, manifest)

    # ----- backend hooks --------------------------------------------------------------
    def _topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Hkv, N, D) -> scores, slots (B, Hkv, N, k); slot -1 where nothing was found."""
        raise NotImplementedError

    def _index_write(self, keys: torch.Tensor, first: torch.Tensor) -> None:
        """keys (B, Hkv, n, D) about to be written as entries first[b] .. first[b] + n - 1."""

    def _after_write(self) -> None:
        pass

    def _index_reset(self, mask: torch.Tensor) -> None:
        pass

    def _index_load(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def _writable(self, action: str) -> None:
        if self.shared:
            raise StoreError(f"cannot {action} a shared read-only store (knowledge memory); build it as an "
                             f"ordinary one-row store, write it, then call share() or save and load it")


def _fused_topk():
    """memlm.memory.knn.fused_topk, imported on first use on a GPU (it imports triton)."""
    from memlm.memory.knn import fused_topk
    return fused_topk


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
        # (masked by counts) rather than read the Python bound, whose changes would recompile it
        C = self.capacity if torch.compiler.is_compiling() else self.filled
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
    memory, and how to mix the two is our choice. Measured (BENCHMARKS.md): replacing the own
    store raised test bpb on an H200 (0.8166 -> 0.8220); on a CPU, with seed-knn-tiny, add raised
    it too (2.677 -> 2.700) while fill left it unchanged with the gate and lowered it with the
    joint softmax (2.6448 -> 2.6420; 4% lower on a document's first 128 bytes)."""

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


# ----- persistence ----------------------------------------------------------------------

def _save_atomic(directory: Path, files: dict[str, dict[str, torch.Tensor]], manifest: dict) -> Path:
    """Write `files` and the manifest into a temporary sibling directory, then rename it to
    `directory` (an existing saved store there is replaced; anything else is refused)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())
                               and not (directory / MANIFEST).is_file()):
        raise StoreError(f"refusing to overwrite {directory}: it exists and holds no saved store")

    def fill(tmp: Path) -> None:
        listed = {**manifest, "files": {}}
        for name, tensors in files.items():
            safetensors.torch.save_file(tensors, str(tmp / name))
            listed["files"][name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(listed, indent=2) + "\n")

    return write_dir_atomically(directory, fill)


def load_store(directory: str | Path, device: torch.device | str | None = None, shared: bool | None = None,
               **expected) -> Store:
    """Read a store written by `Store.save`, verifying the manifest, every file's checksum and
    every tensor's shape; `expected` (e.g. kind="faiss", heads=2, dim=64) must match the
    manifest. `shared` overrides the saved flag. Raises StoreError naming the bad file."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read the store manifest {path}: {e}") from None
    try:
        if (manifest["format"], manifest["version"]) != (FORMAT, VERSION):
            raise StoreError(f"{path} is not a memlm kNN store of version {VERSION} "
                             f"(format {manifest['format']!r}, version {manifest['version']!r})")
        kind, rows, heads, dim, capacity = (manifest[k] for k in ("kind", "rows", "heads", "dim", "capacity"))
        counts, written, pointer = manifest["counts"], manifest["written"], manifest["write_pointer"]
        files, options, dtype = manifest["files"], dict(manifest["options"]), manifest["dtype"]
        for name, want in expected.items():  # top-level fields, or backend options such as index
            have = manifest[name] if name in manifest else options.get(name)
            if have != want:
                raise StoreError(f"{path}: the saved store has {name}={have!r}, expected {want!r}")
        sizes_ok = all(isinstance(v, int) and v > 0 for v in (rows, heads, dim, capacity))
        if not sizes_ok or not (len(counts) == len(written) == len(pointer) == rows) or any(
                w < 0 or c != min(w, capacity) or p != w % capacity for c, w, p in zip(counts, written, pointer)):
            raise StoreError(f"{path} is inconsistent (sizes, counts, written and write_pointer disagree)")
    except (KeyError, TypeError) as e:
        raise StoreError(f"{path} lacks or garbles the field {e}") from None
    needed = [KEYS, VALUES, POSITIONS] + ([INDEXES] if kind == "faiss" and options.get("index") != "flat" else [])
    state: dict[str, torch.Tensor] = {}
    for name in needed:
        file = directory / name
        if name not in files:
            raise StoreError(f"{path} lists no {name}")
        if not file.is_file():
            raise StoreError(f"missing store file {file}")
        if file.stat().st_size != files[name].get("bytes") or sha256_file(file) != files[name].get("sha256"):
            raise StoreError(f"store file {file} is corrupted or truncated (its size or sha256 does not match "
                             f"{MANIFEST})")
        try:
            state.update(safetensors.torch.load_file(str(file)))
        except (OSError, RuntimeError, safetensors.SafetensorError) as e:
            raise StoreError(f"cannot read store file {file}: {str(e).splitlines()[0]}") from None
    shapes = {KEYS: ("keys", (rows, heads, capacity, dim)), VALUES: ("values", (rows, heads, capacity, dim)),
              POSITIONS: ("positions", (rows, capacity))}
    for name, (key, shape) in shapes.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise StoreError(f"store file {directory / name} holds {key} of shape {got}, the manifest says {shape}")
    if str(state["keys"].dtype).removeprefix("torch.") != dtype:
        raise StoreError(f"store file {directory / KEYS} holds {state['keys'].dtype}, the manifest says {dtype}")
    state["counts"] = torch.tensor(counts, dtype=torch.long)
    state["written"] = torch.tensor(written, dtype=torch.long)
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
