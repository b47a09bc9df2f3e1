"""Persistent memory: "Augmenting Self-attention with Persistent Memory" (Sukhbaatar et al.,
arXiv 1907.01470).

N learned key/value vectors per key/value head, without position, always visible, so a layer can
store what a feed-forward layer would ("Transformer Feed-Forward Layers Are Key-Value Memories",
arXiv 2012.14913); set feedforward.kind=none to let them replace it. They are scored against the
unrotated queries and merged into the layer's attention exactly, through the kernel's
log-sum-exp (memlm.nn.kernels.merge_partials).

Departures: they are initialised randomly and trained with the rest (the paper rescales them by
sqrt(d)); there is one set per key/value head, not per query head, so under multi-query attention
every head reads the same N vectors, as it reads the same segment keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlm.nn.kernels import shared_key_attention


class PersistentMemory(nn.Module):
    def __init__(self, kv_heads: int, vectors: int, head_dim: int, init_std: float):
        super().__init__()
        self.k = nn.Parameter(torch.randn(kv_heads, vectors, head_dim) / math.sqrt(head_dim))  # (Hkv, N, D)
        self.v = nn.Parameter(torch.randn(kv_heads, vectors, head_dim) * init_std)  # (Hkv, N, D)

    def forward(self, q: torch.Tensor, scale: float, dropout_p: float, qk_norm: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, D) unrotated and scaled -> (out (B, H, T, D), lse (B, H, T)); unit keys under QK-norm."""
        k = F.normalize(self.k, dim=-1) if qk_norm else self.k
        return shared_key_attention(q, k[None].to(q.dtype), self.v[None].to(q.dtype), scale, dropout_p)


def rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook for the model: checkpoints written before this module held the
    vectors as `...attention.persistent_k` / `persistent_v`; they load as `...attention.persistent.k` / `.v`."""
    for key in [key for key in state_dict if key.startswith(prefix) and key.endswith((".persistent_k", ".persistent_v"))]:
        new = key[:-len("_k")] + "." + key[-1]
        if new not in state_dict:
            state_dict[new] = state_dict.pop(key)
