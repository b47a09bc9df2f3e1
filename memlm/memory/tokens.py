"""Memory tokens: "Memory Transformer" (Burtsev et al., arXiv 2006.11527) and, in recurrent mode,
after "Recurrent Memory Transformer" (Bulatov et al., arXiv 2207.06881).

M learned memory embeddings join every segment's input: the memory is extra positions in the
input itself. A segment of `seq_len` stream positions starting at s runs as one causal sequence

    [ read_1 .. read_M | x_s .. x_{s+seq_len-1} | write_1 .. write_M ]     (write: recurrent mode)
      s-M   ..   s-1     s   ..   s+seq_len-1     s+seq_len .. s+seq_len+M-1   (relative positions)

Departures from the papers:
- causal placement: a causal LM cannot let memory see future tokens, so the read tokens come
  first (they see each other causally and every segment token sees them) and, in recurrent
  mode, separate write tokens come last and see the whole segment (RMT's layout; in the Memory
  Transformer the memory sees the whole sequence).
- no memory controller: read and write tokens go through the ordinary blocks.
- recurrent mode: the write tokens' final hidden states (before the final norm) are the next
  segment's read inputs; write inputs are the same learned embedding as the first read.
  Gradients flow through them between the segments of one call; `State.detach` cuts them
  between calls (RMT backpropagates through several segments).
- positions: relative schemes (RoPE, xPos, T5) see memory tokens at the consecutive positions
  drawn above; absolute schemes (learned, sinusoidal) give them no embedding. TUPE is refused
  at config time. Logits of memory positions are dropped.

Segments are cut at stream positions that are multiples of seq_len, so tokens fed one by one
see exactly what a whole segment sees. Without a state, a call runs its input as one stream
from an empty state and returns no state, so it equals feeding the input segment by segment
from `init_state` (kNN memory aside: its stores live in a state); without recurrent memory
tokens or recurrent memory the seq_len pieces are independent and run side by side in one
batch. The state holds the key/value cache of the current segment only (read tokens
included) and, in recurrent mode, on layer 0 'memory_tokens' (B, M, W), the read inputs of the
current segment, with 'memory_written' (B,) (False: use the learned embedding). When a segment
completes its cache is dropped: the memory tokens, not a cache, carry the past.

Reset: `State.reset` clears 'memory_tokens' / 'memory_written' of the forgotten rows, so a row
reset at a segment boundary continues exactly like a fresh stream. A row reset inside a
segment stops seeing that segment's earlier tokens and, in recurrent mode, its read tokens
(they carry the forgotten past); its next segment reads memory written from the new document.

Combined with recurrent memory (memlm.memory.xl: Transformer-XL memory, per-layer
lengths, feedback, compressive memory, and adaptive span / persistent memory riding on them)
and kNN memory (memlm.memory.knn), each layer also attends over its recurrent memory, which
holds earlier segments' TOKEN positions only, placed just before the read tokens:

    [ cmem | mem_1 .. mem_n ] [ read_1 .. read_M | x_s .. x_{s+L-1} | write_1 .. write_M ]
      s-M-n-|cmem| .. s-M-1     s-M .. s-1          s .. s+L-1          s+L .. s+L+M-1

- memory tokens are not pushed into the recurrent memory or the kNN store: read tokens are
  already the summary the next segment gets (in recurrent mode the write tokens become it),
  and keeping memory slots for them would spend the memory length on M copies of "the past"
  per segment. So XL memory, compression, feedback ('memory': layer i+1's outputs at token
  positions; 'add': added to the token positions by in-segment index) and the kNN store
  (keys/values of the segment's tokens, at their stream positions) see tokens only, exactly as
  without memory tokens.
- positions: every segment uses the same frame, so relative schemes (RoPE, xPos, T5) see a
  memory key at its true distance + M from a segment token (the read tokens sit between);
  `MemoryTokenContext.memory_shift` maps the frame back to true stream positions where the
  row reset mask (`row_start`) needs them.
- the state holds hidden states instead of a key/value cache (as the recurrence does): per
  layer 'mem' / 'cmem' (earlier segments), and while a segment is unfinished 'read' (B, M, W),
  the block inputs at its read positions, plus 'pending' (B, T_p, W), the block inputs at its
  tokens so far (and 'top' on the top layer, 'feedback' for additive feedback). A piece that
  continues a segment sees [cmem | mem | read | pending] as memory, projected with the
  layer's weights, which are the keys a whole-segment pass computes: feeding a stream token
  by token (generation) gives the logits of feeding it segment by segment. When a segment
  completes, 'pending' rolls into 'mem' (memlm.memory.xl.next_layers), kNN stores are
  written and 'read' is dropped.
- a row reset inside a segment also stops seeing the segment's read tokens in the
  non-recurrent mode: above layer 0 they attended to the recurrent memory, i.e. the past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memlm.config import ModelConfig
from memlm.memory import xl
from memlm.state import State
from memlm.nn.attention import SegmentContext


class MemoryTokens(nn.Module):
    """The learned (M, W) memory embedding: first read inputs, and write inputs (recurrent mode)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.count = config.memory.tokens.count
        self.recurrent = config.memory.tokens.recurrent
        self.embedding = nn.Parameter(torch.randn(self.count, config.width) * config.init_std)  # (M, W)

    def learned(self, batch: int) -> torch.Tensor:
        return self.embedding.expand(batch, -1, -1)  # (B, M, W)

    def read_inputs(self, layer: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """(B, M, W) read inputs of a segment: written memory where a row has one, else learned."""
        learned = self.learned(batch)
        if "memory_tokens" not in layer:
            return learned
        written = layer["memory_written"][:, None, None]  # (B, 1, 1)
        return torch.where(written, layer["memory_tokens"].to(learned.dtype), learned)


@dataclass
class MemoryTokenContext(SegmentContext):
    """SegmentContext whose read tokens ignore `row_start` (they sit before the segment) unless
    `read_visible` says a row must not see them, and whose keys before the read tokens
    (recurrent memory) sit `memory_shift` positions before their true stream positions."""

    read_start: int = 0
    """Position of the first read token of the current segment."""
    read_count: int = 0
    read_visible: torch.Tensor | None = None
    """(B,) bool: rows that see the read tokens; None = all rows."""
    memory_shift: int = 0
    """True stream position - frame position of the keys before `read_start` (= M with
    recurrent memory: the read tokens are inserted between the memory and the segment)."""

    def key_positions(self, cache_len: int, q_len: int, device: torch.device) -> torch.Tensor:
        positions = super().key_positions(cache_len, q_len, device)  # frame positions
        if self.memory_shift:
            positions = torch.where(positions < self.read_start, positions + self.memory_shift, positions)
        return positions

    def key_mask(self, cache_len: int, q_len: int, device: torch.device) -> torch.Tensor | None:
        mask = super().key_mask(cache_len, q_len, device)
        if mask is None:
            return None
        first = self.q_start - cache_len  # frame position of key 0
        lo = max(0, self.read_start - first)
        hi = min(cache_len + q_len, self.read_start + self.read_count - first)
        if hi > lo:
            mask[:, lo:hi] = True if self.read_visible is None else self.read_visible[:, None]
        return mask


def forward(model, input_ids: torch.Tensor, state: State | None
            ) -> tuple[torch.Tensor, State | None, torch.Tensor | None]:
    """The model's forward with memory tokens: logits (B, T, vocab), the next state and the
    compression loss (None when none was computed)."""
    B, T = input_ids.shape
    x = model.embed(input_ids)  # (B, T, W)
    if model.positions is not None:
        x = x + model.positions(state.position if state is not None else 0, T, x.device).to(x.dtype)
    if T == 0:
        return model.head(model.final_norm(x)), (state._map(lambda t: t) if state is not None else None), None
    if state is None and not model.config.stateful:  # independent pieces: side by side in one batch
        return _stateless(model, x), None, None
    stream = state if state is not None else State.empty(B, len(model.blocks), x.device)
    if model.config.recurrent:  # with recurrent / kNN memory: hidden-state bookkeeping, below
        logits, new_state, loss = _stateful_recurrent(model, x, stream)
    else:
        (logits, new_state), loss = _stateful(model, x, stream), None
    return logits, (new_state if state is not None else None), loss


def _stateless(model, x: torch.Tensor) -> torch.Tensor:
    """Every seq_len piece of x (B, T, W) is a segment on its own, read from the learned memory
    (memory tokens that are not recurrent: nothing passes from one segment to the next)."""
    B, T, W = x.shape
    L, learned = model.config.seq_len, model.memory_tokens.learned
    full = T // L
    logits = []
    if full:  # the full pieces side by side in one batch
        pieces = x[:, :full * L].reshape(B * full, L, W)
        logits.append(_run(model, pieces, 0, None, learned(B * full))[0].reshape(B, full * L, -1))
    if T % L:
        logits.append(_run(model, x[:, full * L:], full * L, None, learned(B))[0])
    return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)


def _stateful(model, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """Feed x (B, T, W) piece by piece, cut at segment boundaries (multiples of seq_len)."""
    mt, L = model.memory_tokens, model.config.seq_len
    B, T, _ = x.shape
    layers = [dict(layer) for layer in state.layers]
    row_start = state.row_start if state.masked else None
    position, done, logits = state.position, 0, []
    while done < T:
        segment_start = position - position % L
        n = min(T - done, segment_start + L - position)
        starts, ends = position == segment_start, position + n == segment_start + L
        if starts:
            caches = [{} for _ in layers]
        elif "k" in layers[0]:
            caches = [{"k": layer["k"], "v": layer["v"]} for layer in layers]
        else:
            raise ValueError(f"the state at position {position} holds no cache of its segment "
                             f"(segments start at multiples of seq_len={L})")
        visible = None
        if row_start is not None and mt.recurrent:  # read tokens carry the past of rows reset since
            visible = row_start <= segment_start
        piece, caches, written = _run(model, x[:, done:done + n], position, caches,
                                      mt.read_inputs(layers[0], B) if starts else None,
                                      write=ends and mt.recurrent, row_start=row_start, read_visible=visible)
        logits.append(piece)
        for layer, cache in zip(layers, caches):
            layer.pop("k", None), layer.pop("v", None)
            if not ends:  # a completed segment's cache is dropped
                layer.update(cache)
        if written is not None:
            layers[0]["memory_tokens"] = written
            layers[0]["memory_written"] = torch.ones(B, dtype=torch.bool, device=x.device)
        position, done = position + n, done + n
    logits = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
    return logits, State(state.position + T, state.row_start, layers, state.masked, state.stores)


def _segment_input(model, x: torch.Tensor, start: int, read: torch.Tensor | None, write: bool,
                   row_start: torch.Tensor | None, read_visible: torch.Tensor | None,
                   stores: dict | None = None, memory_shift: int = 0):
    """[read | x | write] (B, before + T + after, W) for a piece of x at stream positions start..,
    the number of positions before x, and the context of its blocks."""
    mt, L = model.memory_tokens, model.config.seq_len
    B, T, _ = x.shape
    M = mt.count
    before = M if read is not None else 0
    parts = ([read.to(x.dtype)] if read is not None else []) + [x] + ([mt.learned(B).to(x.dtype)] if write else [])
    h = model.dropout(torch.cat(parts, dim=1) if len(parts) > 1 else x)  # (B, before + T + after, W)
    q_start = start - before  # the memory tokens sit at consecutive positions around the segment
    keep = model.forgetful_keep(B, h.shape[1], h.device)
    if keep is not None:  # forgetful masking hides segment tokens, never memory tokens
        keep[:, :before] = True
        keep[:, before + T:] = True
    ctx = MemoryTokenContext(q_start=q_start, row_start=row_start, keep=keep,
                             bias=model.position_bias(q_start, h.shape[1], h.device), stores=stores,
                             read_start=start - start % L - M, read_count=M, read_visible=read_visible,
                             memory_shift=memory_shift)
    return h, before, ctx


def _run(model, x: torch.Tensor, start: int, caches: list[dict] | None, read: torch.Tensor | None,
         write: bool = False, row_start: torch.Tensor | None = None, read_visible: torch.Tensor | None = None):
    """Run the blocks on one piece of one segment.

    x (B, T, W): embedded tokens at stream positions start..start+T-1. read (B, M, W): the read
    inputs when the piece starts its segment (they go first), else None. write: the piece ends
    its segment, so the write tokens go last. caches: per-layer key/value caches ({} to start
    one) or None. Returns logits (B, T, vocab), the new caches and the write tokens' outputs
    (B, M, W) before the final norm (None without write tokens).
    """
    T = x.shape[1]
    h, before, ctx = _segment_input(model, x, start, read, write, row_start, read_visible)
    new_caches = []
    for i, block in enumerate(model.blocks):
        h, cache = block(h, ctx, caches[i] if caches is not None else None)
        new_caches.append(cache)
    logits = model.head(model.final_norm(h[:, before:before + T]))  # (B, T, vocab)
    written = h[:, before + T:] if write else None  # (B, M, W)
    return logits, new_caches, written


MEMORY_TOKEN_KEYS = ("memory_tokens", "memory_written")


def _stateful_recurrent(model, x: torch.Tensor, state: State):
    """Memory tokens with recurrent / kNN memory (see the module docstring): feed x (B, T, W)
    piece by piece, cut at segment boundaries. Returns logits, the next state and the mean
    compression loss (None when none was computed)."""
    mt, L = model.memory_tokens, model.config.seq_len
    B, T, _ = x.shape
    layers = [dict(layer) for layer in state.layers]
    row_start = state.row_start if state.masked else None
    writable = {i: store for i, store in state.stores.items() if not store.shared}  # knowledge is read-only
    position, done, logits, losses = state.position, 0, [], []
    while done < T:
        segment_start = position - position % L
        n = min(T - done, segment_start + L - position)
        starts, ends = position == segment_start, position + n == segment_start + L
        if not starts and "read" not in layers[0]:
            raise ValueError(f"the state at position {position} holds no read tokens of its segment "
                             f"(segments start at multiples of seq_len={L})")
        visible = row_start <= segment_start if row_start is not None else None
        read = mt.read_inputs(layers[0], B) if starts else None
        piece, layers, loss = _run_recurrent(model, x[:, done:done + n], position, layers, read,
                                             ends and mt.recurrent, row_start, visible, state.stores, writable)
        logits.append(piece)
        if loss is not None:
            losses.append(loss)
        position, done = position + n, done + n
    logits = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
    loss = torch.stack(losses).mean() if losses else None
    return logits, State(state.position + T, state.row_start, layers, state.masked, state.stores), loss


def _run_recurrent(model, x: torch.Tensor, start: int, layers: list[dict], read: torch.Tensor | None,
                   write: bool, row_start: torch.Tensor | None, read_visible: torch.Tensor | None,
                   stores: dict, writable: dict):
    """One piece of one segment with recurrent memory: x (B, T, W) at stream positions start..;
    read (B, M, W) when the piece starts its segment. Returns logits (B, T, vocab), the layer
    states after it and the compression loss (None when none was computed)."""
    mt, L = model.memory_tokens, model.config.seq_len
    T = x.shape[1]
    h, before, ctx = _segment_input(model, x, start, read, write, row_start, read_visible, stores, mt.count)
    additive = model.config.memory.feedback.mode == "add"
    inputs = []
    for block, layer in zip(model.blocks, layers):
        if additive:  # the previous segment's upper-layer output, added at the token positions
            tokens = xl.additive_feedback(layer, h[:, before:before + T])
            h = torch.cat([h[:, :before], tokens, h[:, before + T:]], dim=1)
        inputs.append(h)
        # a piece that continues its segment sees the segment's read tokens and tokens so far
        # as memory after the recurrent memory; one that starts it has them in h (read) or none
        parts = [layer[name] for name in ("cmem", "mem") + (() if read is not None else ("read", "pending"))
                 if name in layer and layer[name].shape[1]]
        memory = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        h, _ = block(h, ctx, None, memory)
    logits = model.head(model.final_norm(h[:, before:before + T]))  # (B, T, vocab)

    ends = (start + T) % L == 0
    new, loss = xl.next_layers(model, layers, [t[:, before:before + T] for t in inputs],
                                       h[:, before:before + T], writable, start + T)
    for i, layer in enumerate(new):
        if not ends:  # the segment goes on: keep its read tokens' block inputs
            layer["read"] = inputs[i][:, :before] if read is not None else layers[i]["read"]
        layer.update({name: layers[i][name] for name in MEMORY_TOKEN_KEYS if name in layers[i]})
    if write:  # the write tokens' outputs are the next segment's read inputs
        new[0]["memory_tokens"] = h[:, before + T:]
        new[0]["memory_written"] = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return logits, new, loss
