"""Adaptive attention span: "Adaptive Attention Span in Transformers" (Sukhbaatar et al.,
arXiv 1905.07799).

Each head h learns a span z_h in [0, S]. The soft mask of a key at distance x is
m_z(x) = clamp((R + z - x) / R, 0, 1); attention weights become m * exp(s) / sum(m * exp(s)),
which is softmax(s + log m): the mask enters the kernels as one more additive score bias.
The penalty (mean span in positions) goes into aux_loss and spans are clamped to [0, S] after
each optimizer step (`clamp_`). Short spans save compute through `window`: keys at that distance
or more are masked for every head, which the kernels take as a sliding window (FlexAttention
skips whole blocks beyond it), so memory keeps one shape for torch.compile whatever the spans.
Departures: z is stored in positions rather than as a fraction of S; the paper drops keys beyond
the span from the computation itself, here the saving is FlexAttention's block sparsity (128-key
blocks) and the eager and sdpa kernels compute the masked scores.

The spans' gradient (`gradient` "dense", the default) flows through the kernel's gradient of the
whole (H, Tq, Tk) bias, which FlexAttention accumulates with an atomic add per score. With
`gradient` "band" the kernel takes the bias detached and the gradient comes from the ramp band
alone, exactly: only keys at distance z <= d < z + R have d(log m)/dz = 1 / (R m) != 0, and there
P_ij / (R m_ij) = exp(s_ij - lse_i) / R, whatever m is (s the score without the soft mask). So, with
out2 and lse2 an attention over each query's band keys only (`band_attention`, no soft mask) and
A_i = exp(lse2_i - lse_i) / R, dL/dz = sum_i A_i dO_i . (out2_i - O_i), and d lse_i / dz = A_i:
`band_gradient` adds terms worth zero whose gradients are those.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AdaptiveSpan(nn.Module):
    def __init__(self, heads: int, span_max: int, ramp: int, init: float, gradient: str):
        super().__init__()
        self.span_max, self.ramp, self.gradient = span_max, ramp, gradient
        self.span = nn.Parameter(torch.full((heads,), init * span_max))  # (H,) in positions
        self.register_load_state_dict_post_hook(lambda module, keys: module.clamp_())

    def window(self) -> torch.Tensor:
        """0-d float tensor: keys at distance >= window have mask 0 for every head (the longest
        span plus the ramp, at most span_max + ramp); a tensor, so reading it needs no device sync
        and a compiled graph no guard on its value."""
        return self.span.detach().clamp(0, self.span_max).max() + self.ramp

    @property
    def limit(self) -> int:
        """`window` as the smallest integer distance that is masked for every head: a host read,
        for reports and tests; the model itself uses `window`."""
        return int(math.ceil(self.window().item()))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.span.clamp_(0, self.span_max)

    def mask(self, distance: torch.Tensor) -> torch.Tensor:
        """distance (Tq, Tk) -> soft mask (H, Tq, Tk) in [0, 1]."""
        return ((self.ramp + self.span[:, None, None] - distance) / self.ramp).clamp(0, 1)

    def forward(self, q_len: int, k_len: int, k_offset: int, device: torch.device) -> torch.Tensor:
        """Additive log-mask (H, Tq, Tk): log m where m > 0, -inf where the mask is 0."""
        q_pos = torch.arange(q_len, device=device)
        k_pos = torch.arange(k_offset, k_offset + k_len, device=device)
        m = self.mask((q_pos[:, None] - k_pos[None, :]).clamp_min(0).float())
        return torch.where(m > 0, m.clamp_min(1e-30).log(), float("-inf"))  # clamp: no NaN gradient at 0

    def band(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's ramp band, (low, high) (H,) each, detached: the distances d with
        low <= d < high have a soft mask strictly below 1 (or exactly 1 at d = z, where the clamp
        still passes the gradient) and above 0."""
        low = self.span.detach()
        return low, low + self.ramp

    def band_gradient(self, out: torch.Tensor, lse: torch.Tensor, band_out: torch.Tensor,
                      band_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's result `out` (B, H, T, D) and log-sum-exp (B, H, T), computed
        with this span's bias detached, plus terms of value zero that give the spans their exact
        gradient: band_out, band_lse (B, H, T, D), (B, H, T) from `band_attention` over the
        same queries and keys (see the module docstring)."""
        weight = ((band_lse.float() - lse.float().detach()).exp() / self.ramp).detach()  # (B, H, T): A
        moved = (self.span - self.span.detach())[None, :, None]  # (1, H, 1), zero-valued
        change = weight[..., None] * (band_out.float() - out.detach().float())  # (B, H, T, D)
        out = out + (moved[..., None] * change).to(out.dtype)
        return out, lse + moved * weight

    def penalty(self) -> torch.Tensor:
        return self.span.mean()
