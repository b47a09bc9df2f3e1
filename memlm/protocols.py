"""The interfaces between layers: how a memory mechanism plugs into a layer's attention.

memlm.nn.attention knows these shapes only; memlm.model attaches the mechanisms of memlm.memory
that the config turns on. Each is an nn.Module (its parameters are the model's), so the
attribute it sits on (`attention.span`, `attention.persistent`, `attention.knn`) is also its
name in the state dict.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ScoreBias(Protocol):
    """An additive score term over the keys that have positions (adaptive span's soft mask).

    `limit`: keys at distance >= limit get -inf for every head, so memory beyond it may be
    dropped before the kernel (a Python int: no device sync)."""

    limit: int

    def __call__(self, q_len: int, k_len: int, k_offset: int, device: torch.device) -> torch.Tensor:
        """(H, Tq, Tk) additive bias for queries 0..Tq-1 and keys k_offset..k_offset+Tk-1."""


class PositionlessSource(Protocol):
    """Keys and values without positions, visible to every query (persistent memory): its partial
    attention is merged into the kernel's result exactly, through the log-sum-exps."""

    def __call__(self, q: torch.Tensor, scale: float, dropout_p: float, qk_norm: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, D) unrotated, already scaled -> (out (B, H, T, D), lse (B, H, T))."""


class RetrievalSource(Protocol):
    """Per-query retrieved keys and values from a store (kNN memory), combined with the local
    result by a gate or by an exact merge."""

    combine: str
    """"joint" (needs the kernel's log-sum-exp) or "gate"."""

    def __call__(self, local: torch.Tensor, local_lse: torch.Tensor | None, store, q: torch.Tensor,
                 scale: float, dropout_p: float) -> torch.Tensor:
        """local (B, H, T, D) and its lse (B, H, T) -> the combined output (B, H, T, D)."""
