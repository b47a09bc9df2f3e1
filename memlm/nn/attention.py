"""Causal self-attention with grouped / multi-query heads, QK-norm and pluggable positions.

- Multi-query attention: "Fast Transformer Decoding: One Write-Head is All You Need"
  (Shazeer, arXiv 1911.02150); `kv_heads` between 1 and `heads` gives grouped attention.
- QK-norm: "Query-Key Normalization for Transformers" (Henry et al., arXiv 2010.04245):
  q and k are L2-normalised per head and the scores multiplied by a learnable scalar g
  (one per layer) in place of 1/sqrt(d); g starts at log2(L^2 - L), L the training length.

The layer computes q, k, v for the segment, prepends what its state holds (recurrent
memory, projected with this layer's weights, or a key/value cache), applies the position
scheme to the whole key range and calls one kernel. Keys are cached before rotation, so rotary
and xPos are always applied at distances measured from the current segment.

Memory mechanisms plug in through three attributes (memlm.protocols), set by memlm.model from
memlm.memory; this module imports none of them:
- `span` (ScoreBias, adaptive span): one more additive score term, and a window beyond which
  the kernel may skip keys (the memory keeps its length, so compiled graphs keep their shapes).
- `persistent` (PositionlessSource, persistent memory): keys without position, scored against the
  unrotated queries and merged in exactly through the kernel's log-sum-exp.
- `knn` (RetrievalSource, kNN memory): per-query retrieved pairs from the store of this layer in
  `SegmentContext.stores`, combined by a gate or an exact merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from memlm.config import ModelConfig
from memlm.nn.kernels import attend, band_attention, merge_partials
from memlm.nn.positions import Rotary
from memlm.protocols import PositionlessSource, RetrievalSource, ScoreBias


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
    stores: dict | None = None
    """kNN memory stores by layer (memlm.memory.knn.stores), or None."""
    sources: dict[int, list] = field(default_factory=dict)
    """Per-row positionless sources by layer (memlm.protocols.SourceRead), merged exactly."""

    def key_mask(self, cache_len: int, q_len: int, device: torch.device) -> torch.Tensor | None:
        """(B, cache_len + q_len) bool, True where a key may be seen, or None if all may."""
        if self.row_start is None and self.keep is None:
            return None
        batch = (self.row_start if self.row_start is not None else self.keep).shape[0]
        mask = torch.ones(batch, cache_len + q_len, dtype=torch.bool, device=device)
        if self.keep is not None:
            mask[:, cache_len:] = self.keep
        if self.row_start is not None:
            mask &= self.key_positions(cache_len, q_len, device)[None, :] >= self.row_start[:, None]
        return mask

    def key_positions(self, cache_len: int, q_len: int, device: torch.device) -> torch.Tensor:
        """(cache_len + q_len,) stream positions of the keys, compared with `row_start`."""
        return torch.arange(self.q_start - cache_len, self.q_start + q_len, device=device)


KeysValues = tuple[torch.Tensor, torch.Tensor]
"""Keys and values (B, Hkv, T, D) each, unrotated: a key/value cache."""


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
            m = config.memory
            reach = config.seq_len + max(config.memory_lengths(training=False)) + m.compressive.length + (m.tokens.count or 0)
            self.rotary = Rotary(p.rope_dim or self.head_dim, p.rope_base,
                                 p.xpos_gamma if p.kind == "xpos" else None, p.xpos_scale_base,
                                 table_reach=2 * reach)
        # memory mechanisms, attached by memlm.model when the config turns them on (memlm.protocols)
        self.span: ScoreBias | None = None
        self.persistent: PositionlessSource | None = None
        self.knn: RetrievalSource | None = None
        # TUPE scales content logits by 1/sqrt(2d) to match its positional term.
        self.scale = 1.0 / math.sqrt((2 if p.kind == "tupe" else 1) * self.head_dim)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, W) -> q (B, H, T, D), k and v (B, Hkv, T, D); q and k normalised under QK-norm."""
        B, T, _ = h.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(h).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.qk_scale is not None:
            q = nn.functional.normalize(q, dim=-1)
            k = nn.functional.normalize(k, dim=-1)
        return q, k, v

    def project_kv(self, h: torch.Tensor, detach_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values only (B, Hkv, T, D) of h (B, T, W): memory needs no queries.
        detach_weights: no gradient reaches this layer's projection."""
        return self._project_rows(h, self.heads * self.head_dim, self.kv_heads, 2, detach_weights)

    def _project_rows(self, h: torch.Tensor, start: int, heads: int, parts: int, detach_weights: bool):
        """`parts` projections of `heads` heads each from rows start.. of qkv, each (B, heads, T, D);
        the first is unit under QK-norm (queries or keys)."""
        B, T, _ = h.shape
        D, rows = self.head_dim, slice(start, start + parts * heads * self.head_dim)
        weight, bias = self.qkv.weight[rows], self.qkv.bias[rows] if self.qkv.bias is not None else None
        if detach_weights:
            weight, bias = weight.detach(), bias.detach() if bias is not None else None
        out = [t.view(B, T, heads, D).transpose(1, 2)
               for t in nn.functional.linear(h, weight, bias).split(heads * D, dim=-1)]
        if self.qk_scale is not None:
            out[0] = nn.functional.normalize(out[0], dim=-1)
        return tuple(out)

    def content_qkv(self, h: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This layer's position-free queries from h (B, T, W) and keys and values from memory
        (B, n, W), every weight detached (compressive memory's reconstruction loss and usage
        ranking): q (B, H, T, D) already scaled (QK-norm's g or 1/sqrt(d)), so that the scores are
        q k^T, and k, v (B, H, n, D) with grouped heads repeated to the query heads."""
        (q,) = self._project_rows(h, 0, self.heads, 1, True)
        k, v = self.project_kv(memory, detach_weights=True)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = self.scale if self.qk_scale is None else self.qk_scale.detach().to(q.dtype)
        return q * scale, k, v

    def content_scores(self, h: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores of `content_qkv` (B, H, T, n) in float32 (QK-norm, its scale g or 1/sqrt(d),
        biases; no positions) and the values (B, H, n, D)."""
        q, k, v = self.content_qkv(h, memory)
        return (q @ k.transpose(-1, -2)).float(), v

    def forward(self, h: torch.Tensor, ctx: SegmentContext, past: KeysValues | None = None,
                memory: torch.Tensor | None = None, cache: bool = False) -> tuple[torch.Tensor, KeysValues | None]:
        """h: (B, T, W) -> (B, T, W), and with `cache` the keys/values of every position so far.

        past: keys and values (B, Hkv, Tc, D) of the Tc positions before the segment (a key/value
        cache), unrotated. memory: (B, M, W) normalised hidden states of the M positions just
        before the segment (recurrent memory), projected here with this layer's own weights, as
        Transformer-XL does.
        """
        B, T, _ = h.shape
        q, k, v = self.project(h)
        if memory is not None and memory.shape[1]:
            mk, mv = self.project_kv(memory)
            k = torch.cat([mk, k], dim=2)  # (B, Hkv, M + T, D)
            v = torch.cat([mv, v], dim=2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, Hkv, Tc + T, D)
            v = torch.cat([past[1], v], dim=2)
        new_cache = (k, v) if cache else None
        past = k.shape[2] - T
        k_offset = -past

        scale = self.scale
        if self.qk_scale is not None:
            q = q * self.qk_scale.to(q.dtype)  # g * q̂·k̂ replaces the 1/sqrt(d) scaling
            scale = 1.0
        q_unrotated = q
        if self.rotary is not None:
            q, k = self.rotary(q, k, k_offset)

        dropout = self.dropout if self.training else 0.0
        persistent = self.persistent is not None
        store = ctx.stores.get(self.layer) if self.knn is not None and ctx.stores else None
        sources = ctx.sources.get(self.layer, ())
        need_lse = persistent or bool(sources) or (store is not None and self.knn.combine == "joint")
        bias = ctx.bias(self.layer, k_offset, k.shape[2])
        other_bias, window, span_band = bias, None, None
        if self.span is not None:
            span_bias = self.span(T, k.shape[2], k_offset, h.device)
            if self.span.gradient == "band" and dropout == 0 and torch.is_grad_enabled():
                span_band, span_bias = self.span.band(), span_bias.detach()  # the spans' gradient: below
            bias = span_bias if bias is None else bias + span_bias
            window = self.span.window()
        key_mask = ctx.key_mask(past, T, h.device)
        y = attend(q, k, v, backend=self.backend, k_offset=k_offset, bias=bias, key_mask=key_mask,
                   max_distance=window, scale=scale, dropout_p=dropout,
                   return_lse=need_lse or span_band is not None)  # (B, H, T, D)
        lse = None
        if need_lse or span_band is not None:
            y, lse = y
        if span_band is not None:  # adaptive span's exact gradient from its ramp band alone
            band = band_attention(q, k, v, k_offset=k_offset, low=span_band[0], high=span_band[1],
                                  bias=None if other_bias is None else other_bias.detach(), key_mask=key_mask,
                                  scale=scale)
            y, lse = self.span.band_gradient(y, lse, *band)
        if persistent:  # no position: scored against the unrotated queries, no bias, never masked
            y, lse = merge_partials(y, lse, *self.persistent(q_unrotated, scale, dropout, self.qk_scale is not None))
        for read in sources:  # per-row memories without position (the registry's mechanisms)
            y, lse = merge_partials(y, lse, *read(q_unrotated, dropout))
        if store is not None:  # kNN memory: retrieved pairs have no position either
            y = self.knn(y, lse, store, q_unrotated, scale, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.out(y), new_cache
