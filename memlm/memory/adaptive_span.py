"""Adaptive attention span: "Adaptive Attention Span in Transformers" (Sukhbaatar et al.,
arXiv 1905.07799).

Each head h learns a span z_h in [0, S]. The soft mask of a key at distance x is
m_z(x) = clamp((R + z - x) / R, 0, 1); attention weights become m * exp(s) / sum(m * exp(s)),
which is softmax(s + log m): the mask enters the kernels as one more additive score bias.
The penalty (mean span in positions) goes into aux_loss, spans are clamped to [0, S] after
each optimizer step (`clamp_`), and recurrent memory is trimmed to the longest span so short
spans save compute. Departure: z is stored in positions rather than as a fraction of S.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AdaptiveSpan(nn.Module):
    def __init__(self, heads: int, span_max: int, ramp: int, init: float):
        super().__init__()
        self.span_max, self.ramp = span_max, ramp
        self.span = nn.Parameter(torch.full((heads,), init * span_max))  # (H,) in positions
        self.limit = self._limit()  # read from the float32 parameter, as every clamp_ reads it (CPU: no sync)
        self.register_load_state_dict_post_hook(lambda module, keys: module.clamp_())

    def _limit(self) -> int:
        """Keys at distance >= limit are masked for every head (a Python int: no device sync)."""
        if self.span.is_meta:  # no values (a model built on the meta device to count parameters)
            return self.span_max + self.ramp
        return min(self.span_max + self.ramp, int(math.ceil(self.span.detach().max().item())) + self.ramp)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.span.clamp_(0, self.span_max)
        self.limit = self._limit()

    def mask(self, distance: torch.Tensor) -> torch.Tensor:
        """distance (Tq, Tk) -> soft mask (H, Tq, Tk) in [0, 1]."""
        return ((self.ramp + self.span[:, None, None] - distance) / self.ramp).clamp(0, 1)

    def forward(self, q_len: int, k_len: int, k_offset: int, device: torch.device) -> torch.Tensor:
        """Additive log-mask (H, Tq, Tk): log m where m > 0, -inf where the mask is 0."""
        q_pos = torch.arange(q_len, device=device)
        k_pos = torch.arange(k_offset, k_offset + k_len, device=device)
        m = self.mask((q_pos[:, None] - k_pos[None, :]).clamp_min(0).float())
        return torch.where(m > 0, m.clamp_min(1e-30).log(), float("-inf"))  # clamp: no NaN gradient at 0

    def penalty(self) -> torch.Tensor:
        return self.span.mean()
