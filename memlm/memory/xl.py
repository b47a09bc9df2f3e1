"""Recurrent memory: Transformer-XL recurrence with a memory length per layer.

- "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context" (Dai et al.,
  arXiv 1901.02860): each layer attends over its own inputs from earlier segments (detached
  by the caller through `State.detach`) plus the current segment; this layer's projections
  and positions apply to them as to the segment.
- "Do Transformers Need Deep Long-Range Memory?" (Rae & Razavi, arXiv 2007.03356): a memory
  length per layer (`memory.xl.lengths` or a linear schedule).

What a layer's memory holds is chosen by layerwise feedback (memlm.memory.feedback); the
states that leave it may be compressed (memlm.memory.compressive); a completed segment is also
written to the kNN stores (memlm.memory.knn).

Bookkeeping: a layer's keys are [cmem | mem | read | pending | segment], all at consecutive
positions (`read`: memory tokens' read inputs, memlm.memory.tokens). `pending` collects the
inputs of an unfinished segment (token-by-token generation); once it reaches `seq_len`
positions the segment is complete and rolls into `mem`, cut to the layer's length. Training
with full segments rolls after every step, exactly like Transformer-XL; generation keeps the
same context pattern past the segment length.
"""

from __future__ import annotations

import torch

from memlm.memory import compressive, feedback
from memlm.memory.knn import write_segment
from memlm.state import LayerState

MEMORY_FIELDS = ("cmem", "mem", "read", "pending")
"""LayerState fields that precede the segment as recurrent memory, oldest first."""


def memory_source(layer: LayerState) -> torch.Tensor | None:
    """(B, Mc + M + R + T_p, W) states of the positions before the segment, or None when there are none."""
    parts = [t for t in (getattr(layer, name) for name in MEMORY_FIELDS) if t is not None and t.shape[1]]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


def next_layers(model, layers: list[LayerState], inputs: list[torch.Tensor], top: torch.Tensor,
                stores: dict | None = None, end: int = 0
                ) -> tuple[list[LayerState], torch.Tensor | None, list[torch.Tensor] | None]:
    """The per-layer state after a piece of a segment, the compression loss (None when none was
    computed) and, when the piece completes its segment, the segment's inputs of every layer
    (B, T_seg, W) for the writes of other mechanisms (else None).

    layers: the state before it; inputs[i]: (B, T, W) input of block i at the piece's token
    positions; top: (B, T, W) output of the last block (before the final norm); stores: kNN
    stores by layer, written when a segment completes; end: stream position after the piece.
    Memory tokens' fields are not carried (their owner sets them); the registry mechanisms'
    extensions are, unchanged (their owners write them from the completed segment).
    """
    config, L = model.config, len(inputs)
    pending = [_append(layers[i].pending, inputs[i]) for i in range(L)]
    top_pending = _append(layers[-1].top, top)
    new = [LayerState(cmem=layer.cmem, mem=layer.mem, feedback=layer.feedback, external=layer.external,
                      extensions=dict(layer.extensions)) for layer in layers]
    if pending[0].shape[1] < config.seq_len:  # segment unfinished: keep collecting
        for i in range(L):
            new[i].pending = pending[i]
        new[-1].top = top_pending
        return new, None, None

    for layer, store in (stores or {}).items():  # the completed segment goes to the kNN memory
        write_segment(model.blocks[layer], store, pending[layer], end - pending[layer].shape[1])
    outputs = pending[1:] + [top_pending]  # outputs[j]: (B, T_seg, W) output of block j
    mode, rate = config.memory.feedback.mode, config.memory.compressive.rate
    losses = []
    for i, length in enumerate(config.memory_lengths(model.training)):
        mem = _append(new[i].mem, feedback.memory_source(mode, i, outputs, pending, layers[-1]))
        if rate:
            mem, overflow = compressive.split_overflow(mem, length, rate)
            if overflow.shape[1]:
                compressed, loss = compressive.compress(model.blocks[i], model.compressors[i], pending[i], overflow,
                                                        model.training)
                cmem = _append(new[i].cmem, compressed)
                new[i].cmem = cmem[:, max(0, cmem.shape[1] - config.memory.compressive.length):].contiguous()
                if loss is not None:
                    losses.append(loss)
        # contiguous: a slice of the concatenation has other strides than the first memory, and
        # torch.compile would recompile the next segment for them with dynamic (slower) shapes
        new[i].mem = mem[:, max(0, mem.shape[1] - length):].contiguous() if length else mem[:, :0]
        new[i].feedback = feedback.carried(mode, i, outputs) if mode == "add" else new[i].feedback
    return new, (torch.stack(losses).mean() if losses else None), pending
