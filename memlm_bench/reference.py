"""The dense reference GPT every benchmark row is compared with, in the same run.

nanoGPT-style ("nanoGPT", Karpathy 2022; GPT-2, "Language Models are Unsupervised Multitask
Learners"): learned absolute positions, pre-LayerNorm, GELU MLP (4x), no biases anywhere,
causal attention through torch's fused scaled_dot_product_attention (flash on CUDA), and the
output head tied to the token embedding. Init: normal(0, 0.02), residual output projections
scaled by 1/sqrt(2 * layers). It has a key/value cache so its decoding loop is the same as
memlm.decode.generate's, and nothing else.

Parameters: V*W (tied embedding) + T*W (positions) + L*(12*W^2 + 2*W) + W (final norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Cache = list[dict[str, torch.Tensor]]
"""Per layer {'k', 'v'} of shape (B, H, T_cache, D); appended to in place."""


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.proj.residual_projection = True

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """x (B, T, W) -> (B, T, W); with a cache, attends its keys too and extends it."""
        B, T, W = x.shape
        q, k, v = (t.view(B, T, self.heads, W // self.heads).transpose(1, 2)  # (B, H, T, D)
                   for t in self.qkv(x).split(W, dim=2))
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, Tc + T, D)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if T > 1 and k.shape[2] != T:
            raise ValueError("the reference decodes one token at a time after the prompt")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, W))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)
        self.down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width, bias=False)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width, bias=False)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.seq_len = seq_len
        self.token_embed = nn.Embedding(vocab_size, width)
        self.position_embed = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.token_embed.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * layers) if getattr(module, "residual_projection", False) else 1
                nn.init.normal_(module.weight, 0.0, 0.02 * scale)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B, T) -> (logits (B, T, V), mean cross-entropy over targets (B, T) or None)."""
        T = ids.shape[1]
        start = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        positions = torch.arange(start, start + T, device=ids.device)  # (T,)
        x = self.token_embed(ids) + self.position_embed(positions)  # (B, T, W)
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache is not None else None)
        logits = self.head(self.final_norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss


@torch.no_grad()
def generate(model: ReferenceGPT, prompt: torch.Tensor, new_tokens: int, cache: Cache | None = None) -> torch.Tensor:
    """Greedy decoding with the cache, the loop of memlm.decode.generate: prompt (B, T0) -> (B, T0 + new_tokens).
    `cache` continues earlier tokens (extended in place); `model` may be a torch.compile'd ReferenceGPT."""
    cache = cache if cache is not None else [{} for _ in model.blocks]
    logits, _ = model(prompt, cache=cache)
    pieces = [prompt]
    for step in range(new_tokens):
        next_ids = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        pieces.append(next_ids)
        if step + 1 < new_tokens:
            logits, _ = model(next_ids, cache=cache)
    return torch.cat(pieces, dim=1)
