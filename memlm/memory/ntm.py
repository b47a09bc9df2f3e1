"""Slot memory with learned erase/add writes: "Neural Turing Machines" (Graves, Wayne & Danihelka,
arXiv 1410.5401).

Each chosen layer keeps, per stream, a memory M of N slots (B, N, W).

Reading (content addressing): the layer's queries score every slot by cosine similarity with
the slot's key (the slot through the layer's norm and key projection, as Transformer-XL
projects its memory) times a learned key strength beta_h per head, softmax over slots; the
values are the slots' value projections. The read joins the layer's attention in one softmax
(the kernel's exact log-sum-exp merge), so a query weighs the slots against its context.

Writing: after each completed segment, a learned linear head on the layer's (normalised) inputs
h_t gives, per position, a key k_t, a strength beta_t = softplus(.), an erase vector
e_t = sigmoid(.) and an add vector a_t = tanh(.); the write weights are
w_t = softmax_i(beta_t cos(k_t, M_i)) and M <- M o (1 - E) + A.

Departures from the paper:
- the controller is the transformer layer itself; addressing is by content only (no
  interpolation with the previous weights, no shift, no sharpening gamma).
- a segment writes in one step: its positions address the memory as it was before the segment,
  and their erases and adds combine to first order, E = min(1, sum_t w_t e_t^T) and
  A = sum_t w_t a_t^T, instead of T sequential writes.
- the write of a segment is applied when the next piece reads: the state keeps the slots before
  that write and the segment's inputs, and the write runs with the current weights, so the write
  heads learn from the next segment's loss with the hidden states detached between training steps
  (`State.detach`), as Transformer-XL's memory is detached and projected by the current weights.
- a stream starts (and a reset row restarts) from a learned initial memory, which is not read
  until the first segment is written; positions a reset row forgot are not written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlm.protocols import MemoryMechanism
from memlm.state import register_extension_state, slot


@dataclass
class NtmState:
    slots: torch.Tensor | None = slot("ntm", "(B, N, W) memory before the pending write", True)
    segment: torch.Tensor | None = slot("ntm", "(B, L, W) inputs of the last completed segment, to write", True)
    keep: torch.Tensor | None = slot("ntm", "(B, L) bool: its positions the row may write", True)
    written: torch.Tensor | None = slot("ntm", "(B,) bool: the row has a memory (else the initial one)", True)
    from_initial: torch.Tensor | None = slot("ntm", "(B,) bool: the pending write starts from the initial memory", True)


register_extension_state("ntm", NtmState)


class NtmMemory(MemoryMechanism):
    name = "ntm"

    def __init__(self, config):
        super().__init__()
        c = config.memory.ntm
        self.served = list(c.layers)
        self.heads, self.kv_heads, self.width = config.attention.heads, config.kv_heads, config.width
        self.initial = nn.ParameterDict({str(i): nn.Parameter(torch.randn(c.slots, config.width) * config.init_std)
                                         for i in self.served})  # (N, W) each
        self.controller = nn.ModuleDict({str(i): nn.Linear(config.width, 3 * config.width + 1, bias=config.bias)
                                         for i in self.served})
        for head in self.controller.values():
            nn.init.normal_(head.weight, 0.0, config.init_std)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        self.log_strength = nn.ParameterDict({str(i): nn.Parameter(torch.full((self.heads,), math.log(10.0)))
                                              for i in self.served})  # (H,) read key strengths, log

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.memory.ntm.layers)

    def layers(self) -> list[int]:
        return self.served

    # ----- memory -----------------------------------------------------------------------
    def memory(self, layer: int, block: nn.Module, state: NtmState | None, batch: int) -> torch.Tensor:
        """(B, N, W) the memory now: the pending segment written into the slots of rows that have
        a memory, the initial memory elsewhere."""
        initial = self.initial[str(layer)].expand(batch, -1, -1)
        if state is None or state.written is None:
            return initial
        # rows whose pending write is their first start from the initial memory itself (not a
        # detached copy of it), so the initial memory learns as the write heads do
        base = torch.where(state.from_initial[:, None, None], initial, state.slots.to(initial.dtype))
        written = self.apply_write(layer, block, base, state.segment, state.keep)
        return torch.where(state.written[:, None, None], written.to(initial.dtype), initial)

    def apply_write(self, layer: int, block: nn.Module, slots: torch.Tensor, segment: torch.Tensor,
                    keep: torch.Tensor) -> torch.Tensor:
        """slots (B, N, W) after the write of segment (B, L, W), positions where keep (B, L) is True."""
        W = self.width
        h = block.attn_norm(segment) if block.pre_norm else segment
        out = self.controller[str(layer)](h)  # (B, L, 3W + 1)
        key, erase, add = out[..., :W], torch.sigmoid(out[..., W:2 * W]), torch.tanh(out[..., 2 * W:3 * W])
        strength = F.softplus(out[..., 3 * W:])  # (B, L, 1)
        similarity = F.normalize(key, dim=-1) @ F.normalize(slots.to(key.dtype), dim=-1).transpose(1, 2)  # (B, L, N)
        weights = (strength * similarity).softmax(dim=-1) * keep[..., None]  # (B, L, N)
        erased = torch.einsum("bln,blw->bnw", weights, erase).clamp(max=1.0)  # (B, N, W)
        added = torch.einsum("bln,blw->bnw", weights, add)
        return slots * (1 - erased) + added

    # ----- the mechanism's hooks (memlm.protocols.MemoryMechanism) ---------------------
    def reader(self, layer: int, block: nn.Module, state: NtmState | None):
        if state is None or state.written is None:
            return None
        memory = self.memory(layer, block, state, state.written.shape[0])
        strength = self.log_strength[str(layer)].exp()

        def read(q: torch.Tensor, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
            """q (B, H, T, D) -> (out (B, H, T, D), lse (B, H, T)) over the slots by content."""
            h = block.attn_norm(memory) if block.pre_norm else memory
            k, v = block.attention.project_kv(h.to(q.dtype))  # (B, Hkv, N, D)
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, N, D)
            scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)).float()  # (B, H, T, N)
            scores = scores * strength[None, :, None, None]
            scores = scores.masked_fill(~state.written[:, None, None, None], float("-inf"))
            lse = scores.logsumexp(dim=-1)  # (B, H, T)
            probs = torch.nan_to_num((scores - lse[..., None]).exp()).to(v.dtype)
            if dropout_p > 0:
                probs = F.dropout(probs, dropout_p)
            return probs @ v, lse

        return read

    def write(self, layer: int, block: nn.Module, state: NtmState | None, segment: torch.Tensor,
              keep: torch.Tensor | None = None) -> NtmState:
        B, L, _ = segment.shape
        keep = keep if keep is not None else torch.ones(B, L, dtype=torch.bool, device=segment.device)
        had_memory = state.written if state is not None and state.written is not None else \
            torch.zeros(B, dtype=torch.bool, device=segment.device)
        return NtmState(slots=self.memory(layer, block, state, B), segment=segment, keep=keep,
                        written=torch.ones(B, dtype=torch.bool, device=segment.device), from_initial=~had_memory)
