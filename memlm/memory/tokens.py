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

The model's one forward (memlm.model) calls this module's hooks: `pieces` cuts the input at
segment boundaries, `frame` builds a piece's [read | x | write] input and its context, and
`after_piece` keeps the read tokens' inputs, the written memory and, without recurrent
memory, the segment's cache. Segments are cut at stream positions that are multiples of
seq_len, so tokens fed one by one see exactly what a whole segment sees. Without a state, a call runs its input as one stream
from an empty state and returns no state, so it equals feeding the input segment by segment
from `init_state` (kNN memory aside: its stores live in a state); without recurrent memory
tokens or recurrent memory the seq_len pieces are independent and run side by side in one
batch. The state holds the key/value cache of the current segment only (read tokens
included) and, in recurrent mode, on layer 0 `memory_tokens` (B, M, W), the read inputs of the
next segment, with `memory_written` (B,) (False: use the learned embedding). When a segment
completes its cache is dropped: the memory tokens, not a cache, carry the past.

Reset: `State.reset` clears `memory_tokens` / `memory_written` of the forgotten rows, so a row
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
from memlm.nn.attention import SegmentContext
from memlm.state import LayerState, State


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


class MemoryTokens(nn.Module):
    """The learned (M, W) memory embedding (first read inputs, and write inputs in recurrent
    mode) and the hooks through which the model's forward frames each piece of a segment."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.count = config.memory.tokens.count
        self.recurrent = config.memory.tokens.recurrent
        self.segment = config.seq_len
        self.with_recurrent_memory = config.recurrent  # hidden-state bookkeeping instead of a cache
        self.embedding = nn.Parameter(torch.randn(self.count, config.width) * config.init_std)  # (M, W)

    def learned(self, batch: int) -> torch.Tensor:
        return self.embedding.expand(batch, -1, -1)  # (B, M, W)

    def read_inputs(self, layer: LayerState | None, batch: int) -> torch.Tensor:
        """(B, M, W) read inputs of a segment: written memory where a row has one, else learned."""
        learned = self.learned(batch)
        if layer is None or layer.memory_tokens is None:
            return learned
        written = layer.memory_written[:, None, None]  # (B, 1, 1)
        return torch.where(written, layer.memory_tokens.to(learned.dtype), learned)

    # ----- hooks of the model's forward (memlm.model) ------------------------------------
    def pieces(self, position: int, length: int) -> list[int]:
        """Lengths of the pieces of `length` tokens from `position` on, cut at segment boundaries."""
        lengths = []
        while length:
            n = min(length, self.segment - position % self.segment)
            lengths.append(n)
            position, length = position + n, length - n
        return lengths

    def frame(self, model, x: torch.Tensor, position: int, state: State | None
              ) -> tuple[torch.Tensor, int, MemoryTokenContext]:
        """A piece x (B, T, W) of one segment at stream positions position.. framed as
        [read | x | write] (B, before + T + after, W) (read when it starts its segment, write
        when it ends it in recurrent mode), the number of positions before x, and the context."""
        B, T, _ = x.shape
        L, M = self.segment, self.count
        segment_start = position - position % L
        starts = position == segment_start
        first = state.layers[0] if state is not None else None
        if not starts and first is not None and (first.read if self.with_recurrent_memory else first.k) is None:
            held = "read tokens" if self.with_recurrent_memory else "cache"
            raise ValueError(f"the state at position {position} holds no {held} of its segment "
                             f"(segments start at multiples of seq_len={L})")
        read = self.read_inputs(first, B) if starts else None
        write = state is not None and self.recurrent and (position + T) % L == 0
        row_start = state.row_start if state is not None and state.masked else None
        visible = None
        if row_start is not None and (self.recurrent or self.with_recurrent_memory):
            visible = row_start <= segment_start  # read tokens carry the past of rows reset since
        before = M if read is not None else 0
        parts = ([read.to(x.dtype)] if read is not None else []) + [x] + ([self.learned(B).to(x.dtype)] if write else [])
        h = model.dropout(torch.cat(parts, dim=1) if len(parts) > 1 else x)  # (B, before + T + after, W)
        q_start = position - before  # the memory tokens sit at consecutive positions around the segment
        keep = model.forgetful_keep(B, h.shape[1], h.device)
        if keep is not None:  # forgetful masking hides segment tokens, never memory tokens
            keep[:, :before] = True
            keep[:, before + T:] = True
        ctx = MemoryTokenContext(q_start=q_start, row_start=row_start, keep=keep,
                                 bias=model.position_bias(q_start, h.shape[1], h.device),
                                 stores=state.stores if state is not None else None,
                                 read_start=segment_start - M, read_count=M, read_visible=visible,
                                 memory_shift=M if self.with_recurrent_memory else 0)
        return h, before, ctx

    def after_piece(self, old: list[LayerState], new: list[LayerState], inputs: list[torch.Tensor],
                    top: torch.Tensor, before: int, position: int, length: int) -> list[LayerState]:
        """The layer states after a piece: `new` (the recurrent memory's or the cache's update)
        plus this mechanism's fields. inputs[i]: (B, before + T + after, W) framed input of block
        i (with recurrent memory); top: (B, before + T + after, W) output of the last block."""
        ends = (position + length) % self.segment == 0
        out = []
        for i, (layer, updated) in enumerate(zip(old, new)):
            if self.with_recurrent_memory:  # while the segment goes on, keep its read tokens' inputs
                read = None if ends else (inputs[i][:, :before] if before else layer.read)
                updated = updated.replace(read=read)
            elif ends:  # a completed segment's cache is dropped: the memory tokens carry the past
                updated = updated.replace(k=None, v=None)
            out.append(updated.replace(memory_tokens=layer.memory_tokens, memory_written=layer.memory_written))
        if top.shape[1] > before + length:  # the write tokens' outputs are the next segment's read inputs
            written = top[:, before + length:]
            out[0] = out[0].replace(memory_tokens=written,
                                    memory_written=torch.ones(top.shape[0], dtype=torch.bool, device=top.device))
        return out
