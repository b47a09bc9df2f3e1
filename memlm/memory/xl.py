"""Recurrent memory: Transformer-XL recurrence, depth-dependent lengths and layerwise feedback.

- "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context" (Dai et al.,
  arXiv 1901.02860): each layer attends over its own inputs from earlier segments (detached
  by the caller through `State.detach`) plus the current segment; this layer's projections
  and positions apply to them as to the segment.
- "Do Transformers Need Deep Long-Range Memory?" (Rae & Razavi, arXiv 2007.03356): a memory
  length per layer (`MemoryConfig.lengths` or a linear schedule).
- Layerwise feedback (after "Addressing Some Limitations of Transformers with Feedback
  Memory", Fan et al., arXiv 2002.09402, modified: per layer pair, no pooling, no
  backpropagation through time): layer i's memory holds the previous segments' output of
  layer i+1 (the top layer: its own output, or `external`). Mode `add` instead adds the
  previous segment's output of layer i+1 to layer i's input, position by position.

Bookkeeping: a layer's keys are [mem | pending | segment], all at consecutive positions.
`pending` collects the inputs of an unfinished segment (token-by-token generation); once it
reaches `seq_len` positions the segment is complete and rolls into `mem`, cut to the
layer's length. Training with full segments rolls after every step, exactly like
Transformer-XL; generation keeps the same context pattern past the segment length.
Memory tokens (memlm.memory.tokens) reuse this bookkeeping with token positions only in
`pending` and `mem`; their read tokens' inputs wait beside them in 'read'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.memory import compressive, knn


def empty_like_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, 0, W) tensor matching x (B, T, W)."""
    return x[:, :0]


def memory_source(layer: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(B, Mc + M + T_p, W) states of the positions before the segment, or None when there are none."""
    parts = [layer[name] for name in ("cmem", "mem", "pending") if name in layer and layer[name].shape[1]]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def additive_feedback(layer: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x (B, T, W) plus the previous segment's upper-layer output at the same in-segment index."""
    feedback = layer.get("feedback")
    if feedback is None:
        return x
    offset = layer["pending"].shape[1] if "pending" in layer else 0
    piece = feedback[:, offset:offset + x.shape[1]]  # (B, <= T, W)
    return x + F.pad(piece, (0, 0, 0, x.shape[1] - piece.shape[1])).to(x.dtype)


def next_layers(model, layers: list[dict[str, torch.Tensor]], inputs: list[torch.Tensor],
                top: torch.Tensor, stores: dict | None = None,
                end: int = 0) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
    """The per-layer state after a segment, and the compression loss (None when none was computed).

    layers: the state before it; inputs[i]: (B, T, W) input of block i; top: (B, T, W) output
    of the last block (before the final norm); stores: kNN stores by layer, written when a
    segment completes; end: stream position after the segment.
    """
    config, L = model.config, len(inputs)
    pending = [torch.cat([layers[i]["pending"], inputs[i]], dim=1) if "pending" in layers[i] else inputs[i]
               for i in range(L)]
    top_pending = torch.cat([layers[-1]["top"], top], dim=1) if "top" in layers[-1] else top
    new = [{name: t for name, t in layer.items() if name in ("cmem", "mem", "feedback", "external")}
           for layer in layers]
    if pending[0].shape[1] < config.seq_len:  # segment unfinished: keep collecting
        for i in range(L):
            new[i]["pending"] = pending[i]
        new[-1]["top"] = top_pending
        return new, None

    for layer, store in (stores or {}).items():  # the completed segment goes to the kNN memory
        knn.write_segment(model, layer, store, pending[layer], end - pending[layer].shape[1])
    outputs = pending[1:] + [top_pending]  # outputs[j]: (B, T_seg, W) output of block j
    mode, rate = config.memory.feedback.mode, config.memory.compressive.rate
    losses = []
    for i, length in enumerate(config.memory_lengths(model.training)):
        if mode == "memory":
            source = outputs[i + 1] if i + 1 < L else layers[-1].get("external", outputs[-1])
        else:
            source = pending[i]
        mem = torch.cat([new[i]["mem"], source], dim=1) if "mem" in new[i] else source
        if rate:
            mem, overflow = compressive.split_overflow(mem, length, rate)
            if overflow.shape[1]:
                compressed, loss = compress(model, i, pending[i], overflow)
                cmem = torch.cat([new[i]["cmem"], compressed], dim=1) if "cmem" in new[i] else compressed
                new[i]["cmem"] = cmem[:, max(0, cmem.shape[1] - config.memory.compressive.length):].contiguous()
                if loss is not None:
                    losses.append(loss)
        # contiguous: a slice of the concatenation has other strides than the first memory, and
        # torch.compile would recompile the next segment for them with dynamic (slower) shapes
        new[i]["mem"] = mem[:, max(0, mem.shape[1] - length):].contiguous() if length else empty_like_rows(source)
        if mode == "add":
            new[i]["feedback"] = outputs[i + 1] if i + 1 < L else outputs[-1]
    return new, (torch.stack(losses).mean() if losses else None)


def compress(model, layer: int, segment: torch.Tensor, overflow: torch.Tensor):
    """Compress `overflow` (B, n*c, W) states of `layer`: the compressed states, detached (only the
    reconstruction loss trains the compressor), and that loss in training (else None)."""
    block, compressor = model.blocks[layer], model.compressors[layer]
    frozen_norm = {name: p.detach() for name, p in block.attn_norm.named_parameters()}

    def norm(x):
        return torch.func.functional_call(block.attn_norm, frozen_norm, (x,)) if block.pre_norm else x

    h = norm(segment.detach())
    used = compressive.usage(block.attention, h, norm(overflow.detach())) if compressor.kind == "most_used" else None
    compressed = compressor(overflow.detach(), used)  # (B, n, W)
    loss = None
    if model.training and torch.is_grad_enabled() and compressor.kind == "conv":
        loss = compressive.reconstruction_loss(block.attention, h, norm(overflow), norm(compressed))
    return compressed.detach(), loss
