"""The state a model carries from one segment to the next.

One `State` per batch of streams: the absolute stream position of the next token, one dict
of named tensors per layer (key/value cache, later memories), and per row the position at
which its current document started (`row_start`), so `reset(mask)` forgets a row's past
without touching the others. All rows advance together, so positions are plain ints and
reading them never synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


MEMORY_RECOMPILE_LIMIT = 64
"""torch._dynamo's recompile limit while a model with memory runs compiled (allow_memory_recompiles)."""


def allow_memory_recompiles() -> None:
    """Raise torch._dynamo's recompile limit for a model that carries a state: memories fill,
    compressed memories fill after them, learned spans trim memory to new lengths, and each is a
    new graph (seed-mem-tiny compiles 7 while filling). Past dynamo's limit (8) the forward would
    silently run eagerly for the rest of the run. Applied by whoever compiles (Trainer, bench)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MEMORY_RECOMPILE_LIMIT)


CLEARED_ON_RESET = ("feedback", "memory_tokens", "memory_written")
"""Per-row layer tensors (B, ...) that are not keyed by position, so `row_start` cannot hide
them: `reset` zeroes (False for bool tensors) the rows it forgets."""


@dataclass
class State:
    position: int
    """Absolute stream position of the next token (same for every row)."""
    row_start: torch.Tensor
    """(B,) long: positions before row_start[b] are invisible to row b."""
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Per layer: named tensors: a key/value cache 'k', 'v' (B, Hkv, T_cache, D) for models
    without recurrent memory; for recurrent ones 'mem' (B, M, W) rolled memory, 'pending'
    (B, T_p, W) inputs of the unfinished segment, 'feedback' (B, T, W) for additive feedback,
    and on the top layer 'top' (B, T_p, W) its pending outputs and optionally 'external'
    (B, M, W), a tensor the user supplies as the top layer's feedback memory. Memory tokens
    (memlm.memory.tokens) keep the current segment's cache 'k', 'v' and, in recurrent mode, on
    layer 0 'memory_tokens' (B, M, W) and 'memory_written' (B,) bool."""
    masked: bool = False
    """True once some row was reset: attention must then apply row_start (a Python flag, so
    models that never reset keep the unmasked fast kernels without a device sync)."""
    stores: dict = field(default_factory=dict)
    """kNN memory stores by layer index (memlm.memory.knn.stores). They are external memory, written
    in place when a segment completes, so every State of one stream shares them; `reset` clears
    their rows in place too. A shared read-only store (knowledge memory, memlm.memorize) is
    read by every row and never written, reset or checkpointed; combined with a per-row store
    (stores.WithKnowledge) only the per-row part is."""

    @classmethod
    def empty(cls, batch_size: int, num_layers: int, device: torch.device | str | None = None) -> "State":
        return cls(position=0, row_start=torch.zeros(batch_size, dtype=torch.long, device=device),
                   layers=[{} for _ in range(num_layers)])

    @property
    def batch_size(self) -> int:
        return self.row_start.shape[0]

    def detach(self) -> "State":
        """A copy whose tensors carry no gradient history (no backpropagation through time)."""
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> "State":
        return self._map(lambda t: t.to(device))

    def reset(self, mask: torch.Tensor) -> "State":
        """Forget the past of the rows where mask (B,) is True: they start a new document."""
        if mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        mask = mask.to(self.row_start.device)
        row_start = torch.where(mask, self.position, self.row_start)
        layers = []
        for layer in self.layers:
            layer = dict(layer)
            for name in CLEARED_ON_RESET:  # not keyed by position: clear the forgotten rows
                if name in layer:
                    t = layer[name]
                    forget = mask.to(t.device).view(-1, *[1] * (t.dim() - 1))
                    layer[name] = torch.where(forget, torch.zeros((), dtype=t.dtype, device=t.device), t)
            layers.append(layer)
        for store in self.stores.values():
            if not store.shared:  # knowledge memory belongs to no row: nothing to forget
                store.reset(mask)
        return State(self.position, row_start, layers, masked=True, stores=self.stores)

    def _map(self, fn) -> "State":
        return State(self.position, fn(self.row_start),
                     [{name: fn(t) for name, t in layer.items()} for layer in self.layers], self.masked,
                     self.stores)

    def state_dict(self) -> dict:
        """Tensors and the position, for a training checkpoint."""
        tensors = {"row_start": self.row_start}
        for i, layer in enumerate(self.layers):
            tensors.update({f"layers.{i}.{name}": t for name, t in layer.items()})
        return {"position": self.position, "num_layers": len(self.layers), "masked": self.masked,
                "stores": {i: store.state_dict() for i, store in self.stores.items() if not store.shared},
                "tensors": tensors}

    @classmethod
    def from_state_dict(cls, data: dict) -> "State":
        tensors = data["tensors"]
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(data["num_layers"])]
        for key, t in tensors.items():
            if key.startswith("layers."):
                _, index, name = key.split(".", 2)
                layers[int(index)][name] = t
        return cls(data["position"], tensors["row_start"], layers, data.get("masked", True))
