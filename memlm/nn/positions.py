"""Position schemes.

Absolute positions are stream positions (`start + t`); relative schemes only see distances,
which the attention passes as offsets from the first query of the segment, so rotary
angles and xPos decays stay small and exact however long a stream runs.

- learned absolute / sinusoidal: "Attention Is All You Need" (arXiv 1706.03762).
- RoPE: "RoFormer: Enhanced Transformer with Rotary Position Embedding" (arXiv 2104.09864),
  rotate-half layout on the first `rope_dim` dimensions of each head.
- xPos: "A Length-Extrapolatable Transformer" (arXiv 2212.10554): RoPE plus a per-dimension
  decay zeta_i^(n / scale_base) on q and its inverse on k, zeta_i = (2i/d + gamma)/(1 + gamma).
  Departure: n is measured from the segment's first query (only n - m matters), so the
  scale never under- or overflows on long streams.
- T5 relative bias: "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer" (arXiv 1910.10683), causal log buckets, one learned scalar per head and bucket.
- TUPE: "Rethinking Positional Encoding in Language Pre-training" (arXiv 2006.15595): an
  untied position-to-position term (p_i U_q)(p_j U_k)^T / sqrt(2d) from its own learned
  absolute embeddings and projections, added to the content logits (which TUPE scales by
  1/sqrt(2d) too). As in the paper the term is computed once and shared by all layers.
  Departure: i and j are positions in the window the layer attends (its first key is 0, so
  a query's position is its distance from that key), not in the stream. A stream with
  memory runs on without end while the window never outgrows seq_len + memory, so the table
  needs only that many rows (`ModelConfig.positions_limit`). Where the window starts at the
  stream's beginning (a single pass, a key/value cache, a memory that still holds the whole
  stream) these are the paper's absolute positions; once memory rolls, every position is
  relative to the oldest key still seen, a relative frame the paper's term allows.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_positions(kind: str, start: int, length: int, limit: int) -> None:
    if start < 0 or start + length > limit:
        raise ValueError(
            f"{kind} positions cover 0..{limit - 1}, but this segment needs positions "
            f"{start}..{start + length - 1}; raise max_positions or use a relative position kind "
            f"(rope, xpos, t5)")


def sinusoidal_table(positions: torch.Tensor, width: int) -> torch.Tensor:
    """(T,) positions -> (T, width) sin/cos features with wavelengths up to 10000 * 2 pi."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.double()[:, None] * freqs.double()[None, :]  # (T, half)
    table = torch.cat([angles.sin(), angles.cos()], dim=-1).float()
    if width % 2:
        table = torch.nn.functional.pad(table, (0, 1))
    return table


class AbsolutePositions(nn.Module):
    """Learned or sinusoidal absolute position embeddings added to the token embeddings."""

    def __init__(self, kind: str, width: int, limit: int):
        super().__init__()
        self.kind, self.width, self.limit = kind, width, limit
        self.table = nn.Embedding(limit, width) if kind == "learned" else None

    def forward(self, start: int, length: int, device: torch.device) -> torch.Tensor:  # -> (T, W)
        positions = torch.arange(start, start + length, device=device)
        if self.table is not None:
            check_positions("learned", start, length, self.limit)
            return self.table(positions)
        return sinusoidal_table(positions, self.width)


class Rotary(nn.Module):
    """RoPE (and xPos when `xpos_gamma` is given) applied to q and k at relative positions."""

    def __init__(self, rope_dim: int, base: float, xpos_gamma: float | None = None,
                 xpos_scale_base: float = 512.0, table_reach: int = 0):
        super().__init__()
        self.rope_dim, self.base, self.xpos_gamma = rope_dim, base, xpos_gamma
        self.xpos = xpos_gamma is not None
        if self.xpos:
            self.scale_base = xpos_scale_base
        # cos/sin of the relative positions -reach..reach-1, computed once in float64 and kept in
        # float32: computing them per call costs float64 trigonometry that a compiler may even
        # fuse into (and so repeat in) every head's kernel. Positions outside are computed.
        self.table_reach = table_reach
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers (inverse frequencies, xPos decay, cos/sin table) on
        `device` (None: the default device), e.g. after a loader that knows only the state dict left
        them empty (transformers, memlm.hf)."""
        fractions = torch.arange(0, self.rope_dim, 2, device=device).double() / self.rope_dim  # (rope_dim / 2,)
        self.register_buffer("inv_freq", self.base ** (-fractions), persistent=False)  # (rope_dim / 2,)
        if self.xpos:
            zeta = (fractions + self.xpos_gamma) / (1 + self.xpos_gamma)
            self.register_buffer("log_zeta", zeta.log(), persistent=False)  # (rope_dim / 2,)
        if self.table_reach:
            positions = torch.arange(-self.table_reach, self.table_reach, device=device)
            signs = (1.0, -1.0) if self.xpos else (1.0,)
            tables = [torch.stack(self._tables(positions, torch.float32, sign)) for sign in signs]
            self.register_buffer("table", torch.stack(tables), persistent=False)  # (signs, 2, 2*reach, R)

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype, decay_sign: float):
        angles = positions.double()[:, None] * self.inv_freq[None, :].to(positions.device)  # (T, R/2)
        cos = torch.cat([angles.cos()] * 2, dim=-1)  # (T, R)
        sin = torch.cat([angles.sin()] * 2, dim=-1)
        if self.xpos:
            log_zeta = self.log_zeta.to(positions.device)
            scale = torch.exp(decay_sign * positions.double()[:, None] / self.scale_base * log_zeta)
            scale = torch.cat([scale] * 2, dim=-1)  # (T, R)
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

    def _range_tables(self, start: int, length: int, dtype: torch.dtype, decay_sign: float, device):
        """cos, sin (T, R) of positions start..start+length-1, from the table when it covers them."""
        if self.table_reach and -self.table_reach <= start and start + length <= self.table_reach:
            table = self.table[1 if decay_sign < 0 and self.xpos else 0]  # (2, 2*reach, R)
            piece = table[:, start + self.table_reach:start + self.table_reach + length].to(dtype)
            return piece[0], piece[1]
        return self._tables(torch.arange(start, start + length, device=device), dtype, decay_sign)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor | int, decay_sign: float) -> torch.Tensor:
        """x: (B, H, T, D), positions: (T,) tensor, or an int: the first of T consecutive ones -> (B, H, T, D)."""
        if isinstance(positions, int):
            cos, sin = self._range_tables(positions, x.shape[2], x.dtype, decay_sign, x.device)
        else:
            cos, sin = self._tables(positions, x.dtype, decay_sign)
        r = self.rope_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([rotated, x_pass], dim=-1) if x_pass.shape[-1] else rotated

    def forward(self, q: torch.Tensor, k: torch.Tensor, k_offset: int):
        """q: (B, H, Tq, D) at positions 0..Tq-1, k: (B, Hkv, Tk, D) at k_offset..k_offset+Tk-1."""
        return self.rotate(q, 0, +1.0), self.rotate(k, k_offset, -1.0)


def t5_buckets(distance: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """Causal T5 buckets of distance = query position - key position (negative -> bucket 0)."""
    distance = distance.clamp_min(0)
    exact = buckets // 2
    log_ratio = torch.log(distance.float().clamp_min(1) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (buckets - exact)).long()
    far = far.clamp_max(buckets - 1)
    return torch.where(distance < exact, distance, far)


class T5RelativeBias(nn.Module):
    """One learned scalar per head and log-spaced distance bucket, added to the scores."""

    def __init__(self, heads: int, buckets: int, max_distance: int):
        super().__init__()
        self.buckets, self.max_distance = buckets, max_distance
        self.table = nn.Embedding(buckets, heads)

    def forward(self, q_len: int, k_len: int, k_offset: int, device: torch.device) -> torch.Tensor:
        q_pos = torch.arange(q_len, device=device)
        k_pos = torch.arange(k_offset, k_offset + k_len, device=device)
        bucket = t5_buckets(q_pos[:, None] - k_pos[None, :], self.buckets, self.max_distance)  # (Tq, Tk)
        return self.table(bucket).permute(2, 0, 1)  # (H, Tq, Tk)


class TupeBias(nn.Module):
    """TUPE's untied positional term (p_i U_q)(p_j U_k)^T / sqrt(2 d) per head, at positions in
    the attended window: key j at j, query i at i - k_offset (the keys start k_offset <= 0
    positions before the first query)."""

    def __init__(self, width: int, heads: int, head_dim: int, limit: int):
        super().__init__()
        self.heads, self.head_dim, self.limit = heads, head_dim, limit
        self.table = nn.Embedding(limit, width)
        self.query = nn.Linear(width, heads * head_dim, bias=False)
        self.key = nn.Linear(width, heads * head_dim, bias=False)

    def forward(self, q_len: int, k_len: int, k_offset: int) -> torch.Tensor:
        q_first = -k_offset  # window position of the first query
        window = max(k_len, q_first + q_len)
        if window > self.limit:
            raise ValueError(
                f"TUPE's table covers windows of {self.limit} positions, but this call attends {window} "
                f"(keys before the input plus the input); feed a long input in pieces that do not cross a "
                f"multiple of seq_len, or raise max_positions")
        device = self.table.weight.device
        pq = self.table(torch.arange(q_first, q_first + q_len, device=device))  # (Tq, W)
        pk = self.table(torch.arange(k_len, device=device))  # (Tk, W)
        uq = self.query(pq).view(q_len, self.heads, self.head_dim).transpose(0, 1)  # (H, Tq, D)
        uk = self.key(pk).view(k_len, self.heads, self.head_dim).transpose(0, 1)  # (H, Tk, D)
        return uq @ uk.transpose(1, 2) / math.sqrt(2 * self.head_dim)  # (H, Tq, Tk)
