"""One transformer block: attention and feed-forward sublayers with residual connections.

Pre-norm (GPT-2, "Language Models are Unsupervised Multitask Learners") by default; post-norm
("Attention Is All You Need", arXiv 1706.03762) as an option. A block whose feed-forward
kind is `none` has attention only (the persistent-memory layers of memlm.memory use it).
"""

from __future__ import annotations

import torch
from torch import nn

from memlm.config import ModelConfig
from memlm.nn.attention import Attention, KeysValues, SegmentContext
from memlm.nn.feedforward import FeedForward
from memlm.nn.norms import make_norm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        n, f = config.norm, config.feedforward
        self.pre_norm = n.placement == "pre"
        self.attn_norm = make_norm(n.kind, config.width, n.eps, config.bias)
        self.attention = Attention(config, layer)
        self.feedforward = None
        if f.kind != "none":
            self.ff_norm = make_norm(n.kind, config.width, n.eps, config.bias)
            self.feedforward = FeedForward(f.kind, config.width, f.mult, config.bias, f.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, ctx: SegmentContext, past: KeysValues | None = None,
                memory: torch.Tensor | None = None, cache: bool = False) -> tuple[torch.Tensor, KeysValues | None]:
        """x: (B, T, W) -> (B, T, W), plus with `cache` the keys/values of every position so far.

        past: the key/value cache of the positions before the segment. memory: (B, M, W)
        residual-stream states of the M positions before the segment (recurrent memory); the
        attention sees them through this block's own norm and projections.
        """
        if self.pre_norm:
            memory = self.attn_norm(memory) if memory is not None else None
            h, kv = self.attention(self.attn_norm(x), ctx, past, memory, cache)
            x = x + self.dropout(h)
            if self.feedforward is not None:
                x = x + self.dropout(self.feedforward(self.ff_norm(x)))
        else:
            h, kv = self.attention(x, ctx, past, memory, cache)
            x = self.attn_norm(x + self.dropout(h))
            if self.feedforward is not None:
                x = self.ff_norm(x + self.dropout(self.feedforward(x)))
        return x, kv
