"""Position-wise feed-forward layers.

Squared ReLU is from "Primer: Searching for Efficient Transformers for Language Modeling"
(So et al., arXiv 2109.08668); SwiGLU/GeGLU from "GLU Variants Improve Transformer"
(Shazeer, arXiv 2002.05202). Gated kinds use 2/3 of the hidden width so the parameter
count matches the ungated layer, rounded up to a multiple of 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS = {"gelu": F.gelu, "relu2": squared_relu, "swiglu": F.silu, "geglu": F.gelu}
GATED = ("swiglu", "geglu")


def hidden_width(kind: str, width: int, mult: float) -> int:
    hidden = int(mult * width)
    if kind in GATED:
        hidden = -(-int(2 * hidden / 3) // 8) * 8
    return hidden


class FeedForward(nn.Module):
    """x -> down(drop(act(up(x)))), or down(drop(act(gate(x)) * up(x))) for gated kinds."""

    def __init__(self, kind: str, width: int, mult: float, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[kind]
        hidden = hidden_width(kind, width, mult)
        self.up = nn.Linear(width, hidden * (2 if kind in GATED else 1), bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)
        self.down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W) -> (B, T, W)
        h = self.up(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.kind in GATED:
            gate, h = h.chunk(2, dim=-1)
            return self.down(self.dropout(self.activation(gate) * h))
        return self.down(self.dropout(self.activation(h)))
