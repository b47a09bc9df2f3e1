"""Causal self-attention with grouped / multi-query heads, QK-norm and pluggable positions.

- Multi-query attention: "Fast Transformer Decoding: One Write-Head is All You Need"
  (Shazeer, arXiv 1911.02150); `kv_heads` between 1 and `heads` gives grouped attention.
- QK-norm: "Query-Key Normalization for Transformers" (Henry et al., arXiv 2010.04245):
  q and k are L2-normalised per head and the scores multiplied by a learnable scalar g
  (one per layer) in place of 1/sqrt(d); g starts at log2(L^2 - L), L the training length.

The layer computes q, k, v for the segment, prepends what its state holds (a key/value
cache; later the memory sources of memlm.memory), applies the position scheme to the whole
key range and calls one kernel. Keys are cached before rotation, so rotary and xPos are
always applied at distances measured from the current segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from memlm.config import ModelConfig
from memlm.model.kernels import attend
from memlm.model.positions import Rotary


@dataclass
class SegmentContext:
    """What every layer needs to know about the segment being processed."""

    q_start: int
    """Absolute stream position of the segment's first token."""
    row_start: torch.Tensor | None
    """(B,) first visible position per row, or None when no row hides its past."""
    keep: torch.Tensor | None
    """(B, T) forgetful-masking keep flags for the segment's own keys, or None."""
    bias: Callable[[int, int, int], torch.Tensor | None]
    """(layer, k_offset, Tk) -> additive score bias (H, Tq, Tk) or None."""

    def key_mask(self, cache_len: int, q_len: int, device: torch.device) -> torch.Tensor | None:
        """(B, cache_len + q_len) bool, True where a key may be seen, or None if all may."""
        if self.row_start is None and self.keep is None:
            return None
        batch = (self.row_start if self.row_start is not None else self.keep).shape[0]
        mask = torch.ones(batch, cache_len + q_len, dtype=torch.bool, device=device)
        if self.keep is not None:
            mask[:, cache_len:] = self.keep
        if self.row_start is not None:
            positions = torch.arange(self.q_start - cache_len, self.q_start + q_len, device=device)
            mask &= positions[None, :] >= self.row_start[:, None]
        return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        a, p = config.attention, config.position
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = a.heads, config.kv_heads, config.head_dim
        self.backend, self.dropout = a.backend, a.dropout
        self.qkv = nn.Linear(config.width, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.bias)
        self.out = nn.Linear(self.heads * self.head_dim, config.width, bias=config.bias)
        self.out.residual_projection = True
        self.qk_scale = nn.Parameter(torch.tensor(config.qk_norm_init())) if a.qk_norm else None
        self.rotary = None
        if p.kind in ("rope", "xpos"):
            self.rotary = Rotary(p.rope_dim or self.head_dim, p.rope_base,
                                 p.xpos_gamma if p.kind == "xpos" else None, p.xpos_scale_base)
        # TUPE scales content logits by 1/sqrt(2d) to match its positional term.
        self.scale = 1.0 / math.sqrt((2 if p.kind == "tupe" else 1) * self.head_dim)

    def forward(self, x: torch.Tensor, ctx: SegmentContext,
                cache: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict | None]:
        """x: (B, T, W) -> (B, T, W); cache: {'k', 'v'} of earlier positions, or None (no state)."""
        B, T, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.qk_scale is not None:
            q = nn.functional.normalize(q, dim=-1)
            k = nn.functional.normalize(k, dim=-1)

        new_cache = None
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, Hkv, Tc + T, D)
                v = torch.cat([cache["v"], v], dim=2)
            new_cache = {"k": k, "v": v}
        cache_len = k.shape[2] - T
        k_offset = -cache_len

        if self.rotary is not None:
            q, k = self.rotary(q, k, k_offset)
        scale = self.scale
        if self.qk_scale is not None:
            q = q * self.qk_scale.to(q.dtype)  # g * q̂·k̂ replaces the 1/sqrt(d) scaling
            scale = 1.0

        y = attend(q, k, v, backend=self.backend, k_offset=k_offset,
                   bias=ctx.bias(self.layer, k_offset, k.shape[2]),
                   key_mask=ctx.key_mask(cache_len, T, x.device), scale=scale,
                   dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.out(y), new_cache
