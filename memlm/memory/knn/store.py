"""The store interface of kNN memory: "Memorizing Transformers" (Wu et al., arXiv
2203.08913), with the read/write framing of "Neural Turing Machines" (Graves et al., arXiv
1410.5401): a layer *writes* its past (key, value) pairs to an external memory and *reads*
by content, here the top-k keys by inner product with each query. `Store` holds the ring
buffer and its bookkeeping; a backend (memlm.memory.knn.exact, memlm.memory.knn.faiss_store)
adds the search. `make_store` and `load_store` (memlm.memory.knn.stores) build one.

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

Shared read-only stores (knowledge memory): one "row" that every batch row reads
(`store.share()`, `make_store(..., shared=True)` or `load_store(..., shared=True)`);
`write`, `reset` and `clear` raise StoreError.

Saving and loading (`save`, `state_dict`, `load_store`): memlm.memory.knn.persistence.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["Retrieved", "Store", "StoreError"]


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
        self.counts.copy_(self.written.clamp(max=self.capacity))  # in place: a captured decode step reads it
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
        self.counts.copy_(self.written.clamp(max=self.capacity))
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
        """Write the store to `directory` atomically (memlm.memory.knn.persistence); returns it."""
        from memlm.memory.knn.persistence import save_store  # imported here: persistence imports this module

        return save_store(self, directory)

    # ----- backend hooks --------------------------------------------------------------
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors a search reads. `write` and `reset` change them in place (never rebind
        them), so a CUDA graph that captured a search stays valid across writes
        (memlm.decode.static_memory); `load_state_dict` may replace them."""
        return (self.keys, self.values, self.positions, self.counts, self.written)

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

