"""Compressive memory: "Compressive Transformers for Long-Range Sequence Modelling" (Rae et
al., arXiv 1911.05507).

Memories pushed out of a layer's recurrent memory are compressed by rate c into a compressed
memory (oldest slots dropped past `memory.compressive.length`) that the layer also attends to, placed
before the recurrent memory at consecutive positions as in the paper. Compression functions:
max- and mean-pooling, a learned 1D convolution (kernel = stride = c) and most-used (keep the
1/c memories that the segment's queries attend to most). The attention-reconstruction loss
|attn(h, old) - attn(h, C(old))|^2 uses the layer's content attention with every input and
attention weight detached, so it trains the compressor and nothing else; the compressed
memory enters the state detached, so the language-model loss never reaches the compressor
(also when one call runs several segments, as memory tokens do).
The convolution (kernel = stride = c) runs as one matrix product over groups of c states, which
is the same function without the channels-first layout changes of a convolution kernel.
Departures: when the overflow is not a multiple of c, its oldest (overflow mod c) states are
dropped uncompressed. most-used ranks the leaving memories by the attention (the layer's
content scores: QK-norm and its scale, no positions) that the queries of the segment which
pushes them out give them, not by attention accumulated over their whole stay in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Compressor(nn.Module):
    def __init__(self, kind: str, width: int, rate: int, bias: bool = True):
        super().__init__()
        self.kind, self.rate = kind, rate
        self.conv = nn.Conv1d(width, width, rate, stride=rate, bias=bias) if kind == "conv" else None

    def forward(self, old: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor:
        """old (B, n * c, W) -> (B, n, W); usage (B, n * c) attention received, for most_used."""
        c = self.rate
        if self.kind == "conv":  # kernel = stride = c: one matmul over each group of c states
            B, n = old.shape[0], old.shape[1] // c
            weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)  # (W, c * W), k-major
            return F.linear(old[:, :n * c].reshape(B, n, -1), weight, self.conv.bias)  # (B, n, W)
        if self.kind == "max":
            return F.max_pool1d(old.transpose(1, 2), c).transpose(1, 2)
        if self.kind == "mean":
            return F.avg_pool1d(old.transpose(1, 2), c).transpose(1, 2)
        keep = usage.topk(old.shape[1] // c, dim=1).indices.sort(dim=1).values  # (B, n), in order
        return old.gather(1, keep[..., None].expand(-1, -1, old.shape[2]))


def split_overflow(mem: torch.Tensor, length: int, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mem (B, M', W) -> (kept: its last `length` states, overflow: the newest multiple of `rate`
    of the states before them)."""
    cut = max(0, mem.shape[1] - length)
    usable = cut - cut % rate
    return mem[:, cut:], mem[:, cut - usable:cut]


def content_attention(attention, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Position-free attention of queries from h (B, T, W) over memory (B, n, W) with the layer's
    projections detached -> (B, H, T, D); one fused kernel (no mask), which never writes the
    (B, H, T, n) scores."""
    q, k, v = attention.content_qkv(h, memory)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def usage(attention, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Attention each memory state receives from the queries of h, summed over heads: (B, n)."""
    with torch.no_grad():
        return attention.content_scores(h, memory)[0].softmax(dim=-1).sum(dim=(1, 2))


def reconstruction_loss(attention, h: torch.Tensor, old: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of content attention over the old and the compressed memories."""
    h, old = h.detach(), old.detach()
    return (content_attention(attention, h, old) - content_attention(attention, h, compressed)).pow(2).mean()


def compress(block, compressor: Compressor, segment: torch.Tensor, overflow: torch.Tensor, training: bool):
    """Compress `overflow` (B, n*c, W) states leaving the memory of the layer `block`, whose segment
    inputs are `segment` (B, T, W): the compressed states (B, n, W), detached (only the
    reconstruction loss trains the compressor), and that loss in training (else None)."""
    frozen_norm = {name: p.detach() for name, p in block.attn_norm.named_parameters()}

    def norm(x):
        return torch.func.functional_call(block.attn_norm, frozen_norm, (x,)) if block.pre_norm else x

    h = norm(segment.detach())
    used = usage(block.attention, h, norm(overflow.detach())) if compressor.kind == "most_used" else None
    compressed = compressor(overflow.detach(), used)  # (B, n, W)
    loss = None
    if training and torch.is_grad_enabled() and compressor.kind == "conv":
        loss = reconstruction_loss(block.attention, h, norm(overflow), norm(compressed))
    return compressed.detach(), loss
