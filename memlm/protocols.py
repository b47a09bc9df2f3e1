"""The interfaces between layers: how a memory mechanism plugs into a layer's attention.

memlm.nn.attention knows these shapes only; memlm.model attaches the mechanisms of memlm.memory
that the config turns on. Each is an nn.Module (its parameters are the model's), so the
attribute it sits on (`attention.span`, `attention.persistent`, `attention.knn`) is also its
name in the state dict.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn


class ScoreBias(Protocol):
    """An additive score term over the keys that have positions (adaptive span's soft mask)."""

    def window(self) -> torch.Tensor:
        """0-d tensor: keys at distance >= window get -inf for every head, so a kernel may skip
        them (the kernels' `max_distance`)."""

    def __call__(self, q_len: int, k_len: int, k_offset: int, device: torch.device) -> torch.Tensor:
        """(H, Tq, Tk) additive bias for queries 0..Tq-1 and keys k_offset..k_offset+Tk-1."""

    gradient: str
    """"dense": the bias takes its gradient through the kernel; "band": the layer passes the bias
    detached and calls `band_gradient` with an attention over each head's `band` of keys."""

    def band(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high), (H,) each: the distances low <= d < high where the bias has a gradient."""

    def band_gradient(self, out: torch.Tensor, lse: torch.Tensor, band_out: torch.Tensor,
                      band_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out, lse with zero-valued terms that carry the bias's parameters' gradient."""


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


SourceRead = "Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]"
"""A per-row positionless source read during one piece: (q (B, H, T, D) unrotated and scaled,
dropout_p) -> (out (B, H, T, D), lse (B, H, T); -inf where a row has nothing to read), merged
into the layer's attention exactly (SegmentContext.sources)."""


class MemoryMechanism(nn.Module):
    """A memory mechanism of the registry (memlm.memory.registry): its parameters (this module,
    `model.mechanisms[name]`), its per-layer state (a dataclass registered with
    memlm.state.register_extension_state under `name`, kept in LayerState.extensions), how a
    layer's attention reads it, and how a completed segment writes it.

    Adding a mechanism = its module (a subclass), its config section, its test file and one
    line in the registry. The model reads only what this base class offers."""

    name: str = ""

    @classmethod
    def enabled(cls, config) -> bool:
        """Whether the config turns the mechanism on."""
        raise NotImplementedError

    def layers(self) -> list[int]:
        """The layers it serves."""
        raise NotImplementedError

    def reader(self, layer: int, block: nn.Module, state) -> "Callable | None":
        """The SourceRead of `layer` (whose Block is `block`) given its extension state (None
        before anything was written), or None when there is nothing to read."""
        raise NotImplementedError

    def write(self, layer: int, block: nn.Module, state, segment: torch.Tensor, keep: torch.Tensor | None):
        """The extension state after a completed segment whose inputs of this layer are
        `segment` (B, L, W); keep (B, L) bool: the positions a row may write (False before a
        reset inside the segment), None = all."""
        raise NotImplementedError
