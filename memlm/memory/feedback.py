"""Layerwise feedback, after "Addressing Some Limitations of Transformers with Feedback Memory"
(Fan et al., arXiv 2002.09402), modified: per layer pair, no pooling, no backpropagation through time.

- mode `memory`: layer i's recurrent memory (memlm.memory.xl) holds the previous segments' output
  of layer i+1 instead of its own input; the top layer's holds its own output, or `external`
  (B, M, W), a tensor the user places in the top LayerState.
- mode `add`: the previous segment's output of layer i+1 is added to layer i's input, position by
  position (by index within the segment); the top layer adds its own previous output.

The paper's Feedback Transformer pools every layer into one memory read by all layers and
runs token by token; here each layer reads the layer above it, so segments stay parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.state import LayerState


def memory_source(mode: str, layer: int, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                  top_state: LayerState) -> torch.Tensor:
    """What layer `layer`'s recurrent memory takes from a completed segment (B, T_seg, W).

    outputs[j]: output of block j over the segment; inputs[j]: its input."""
    if mode != "memory":
        return inputs[layer]
    if layer + 1 < len(outputs):
        return outputs[layer + 1]
    return top_state.external if top_state.external is not None else outputs[-1]


def carried(mode: str, layer: int, outputs: list[torch.Tensor]) -> torch.Tensor | None:
    """Mode add: what layer `layer` adds to its input over the next segment (the output of the
    layer above, or the top layer's own), else None."""
    if mode != "add":
        return None
    return outputs[layer + 1] if layer + 1 < len(outputs) else outputs[-1]


def add(layer: LayerState, h: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """h (B, T', W) with the previous segment's upper-layer output added at its `length` token
    positions start.. (matched by index within the segment; memory tokens around them get none)."""
    if layer.feedback is None:
        return h
    offset = layer.pending.shape[1] if layer.pending is not None else 0  # positions of the segment so far
    piece = layer.feedback[:, offset:offset + length]  # (B, <= length, W)
    added = h[:, start:start + length] + F.pad(piece, (0, 0, 0, length - piece.shape[1])).to(h.dtype)
    if start == 0 and length == h.shape[1]:
        return added
    return torch.cat([h[:, :start], added, h[:, start + length:]], dim=1)
