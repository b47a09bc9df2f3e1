"""Normalisation layers: LayerNorm, RMSNorm and ScaleNorm.

ScaleNorm follows "Transformers without Tears: Improving the Normalization of
Self-Attention" (Nguyen & Salazar, arXiv 1910.05895): y = g * x / ||x|| with one learnable
scalar g initialised to sqrt(d). RMSNorm follows "Root Mean Square Layer Normalization"
(Zhang & Sennrich, arXiv 1910.07467).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScaleNorm(nn.Module):
    """g * x / max(||x||, eps) over the last dimension, g a single learnable scalar."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.tensor(math.sqrt(width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., W) -> (..., W)
        return self.scale * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, no mean subtraction and no bias."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., W) -> (..., W)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, width: int, eps: float, bias: bool) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(width, eps)
    if kind == "scalenorm":
        return ScaleNorm(width, eps)
    raise ValueError(f"unknown norm kind {kind!r}")
