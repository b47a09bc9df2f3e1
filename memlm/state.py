"""The state a model carries from one segment to the next.

One `State` per batch of streams: the absolute stream position of the next token, one typed
`LayerState` per layer (key/value cache, memories), and per row the position at which its
current document started (`row_start`), so `reset(mask)` forgets a row's past without
touching the others. All rows advance together, so positions are plain ints and reading them
never synchronises with the device.

Each field of LayerState belongs to one mechanism and declares in its metadata whether `reset`
must clear it: tensors keyed by stream position need not be cleared (`row_start` hides them);
per-row tensors without positions (feedback, memory tokens, slot memories) are zeroed for the
forgotten rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


MEMORY_RECOMPILE_LIMIT = 64
"""torch._dynamo's recompile limit while a model with memory runs compiled (allow_memory_recompiles)."""


def allow_memory_recompiles() -> None:
    """Raise torch._dynamo's recompile limit for a model that carries a state: memories fill,
    compressed memories fill after them, and each length is a new graph. Past dynamo's limit (8)
    the forward would silently run eagerly for the rest of the run. Applied by whoever compiles
    (Trainer, bench)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MEMORY_RECOMPILE_LIMIT)


def slot(owner: str, shape: str, clear_on_reset: bool = False):
    """A state field: None until its mechanism writes it. clear_on_reset: a per-row tensor without
    stream positions, which `State.reset` zeroes for the forgotten rows."""
    return field(default=None, metadata={"owner": owner, "shape": shape, "clear_on_reset": clear_on_reset})


EXTENSION_STATES: dict[str, type] = {}
"""Per-layer state classes of the mechanisms of memlm.memory.registry, by mechanism name: each a
dataclass of tensor fields declared with `slot`, kept in LayerState.extensions[name]."""


def register_extension_state(name: str, cls: type) -> type:
    EXTENSION_STATES[name] = cls
    return cls


def _fields_of(obj: Any) -> dict[str, torch.Tensor]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}


def _map_fields(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return dataclasses.replace(obj, **{name: fn(t) for name, t in _fields_of(obj).items()})


def _forget_fields(obj: Any, mask: torch.Tensor) -> Any:
    """obj with its clear_on_reset fields zeroed (False) where mask (B,) is True."""
    changes = {}
    for f in dataclasses.fields(obj):
        t = getattr(obj, f.name)
        if t is not None and f.metadata.get("clear_on_reset"):
            forget = mask.to(t.device).view(-1, *[1] * (t.dim() - 1))
            changes[f.name] = torch.where(forget, torch.zeros((), dtype=t.dtype, device=t.device), t)
    return dataclasses.replace(obj, **changes)


@dataclass
class LayerState:
    """What one layer carries to the next piece of the stream; a field is None while unused."""

    # key/value cache (models without recurrent memory; memory tokens' current segment)
    k: torch.Tensor | None = slot("cache", "(B, Hkv, T_cache, D)")
    v: torch.Tensor | None = slot("cache", "(B, Hkv, T_cache, D)")
    # Transformer-XL recurrence (memlm.memory.xl)
    mem: torch.Tensor | None = slot("xl", "(B, M, W) rolled memory: block inputs of earlier segments")
    pending: torch.Tensor | None = slot("xl", "(B, T_p, W) block inputs of the unfinished segment")
    top: torch.Tensor | None = slot("xl", "(B, T_p, W) top layer only: its outputs of the unfinished segment")
    # compressive memory (memlm.memory.compressive)
    cmem: torch.Tensor | None = slot("compressive", "(B, Mc, W) compressed memory, before mem")
    # layerwise feedback (memlm.memory.feedback)
    feedback: torch.Tensor | None = slot("feedback", "(B, T, W) upper layer's output, mode add", True)
    external: torch.Tensor | None = slot("feedback", "(B, M, W) top layer only: user-given feedback memory")
    # memory tokens (memlm.memory.tokens)
    read: torch.Tensor | None = slot("tokens", "(B, M, W) block inputs at the read tokens of the current segment")
    memory_tokens: torch.Tensor | None = slot("tokens", "(B, M, W) layer 0: the next read inputs", True)
    memory_written: torch.Tensor | None = slot("tokens", "(B,) bool layer 0: memory_tokens holds written memory", True)
    # mechanisms of the registry (memlm.memory.registry): name -> their own state dataclass
    extensions: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors in use, by name (`<mechanism>.<field>` for extensions)."""
        out = {name: t for name, t in _fields_of(self).items() if name != "extensions"}
        for mechanism, ext in self.extensions.items():
            out.update({f"{mechanism}.{name}": t for name, t in _fields_of(ext).items()})
        return out

    def replace(self, **changes: Any) -> "LayerState":
        return dataclasses.replace(self, **changes)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LayerState":
        fields = {name: fn(t) for name, t in _fields_of(self).items() if name != "extensions"}
        return LayerState(**fields, extensions={k: _map_fields(e, fn) for k, e in self.extensions.items()})

    def forget_rows(self, mask: torch.Tensor) -> "LayerState":
        """A copy with the fields that declare clear_on_reset zeroed (False) where mask (B,) is True."""
        return _forget_fields(self, mask).replace(
            extensions={k: _forget_fields(e, mask) for k, e in self.extensions.items()})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LayerState":
        """The inverse of `tensors`."""
        own = {name: t for name, t in tensors.items() if "." not in name}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if "." in key:
                mechanism, name = key.split(".", 1)
                grouped.setdefault(mechanism, {})[name] = t
        unknown = sorted(set(grouped) - set(EXTENSION_STATES))
        if unknown:
            raise ValueError(f"state of unknown memory mechanisms {unknown}: import the module that registers them")
        return cls(**own, extensions={k: EXTENSION_STATES[k](**v) for k, v in grouped.items()})


def cleared_on_reset() -> tuple[str, ...]:
    """Names of the LayerState fields that `reset` clears."""
    return tuple(f.name for f in dataclasses.fields(LayerState) if f.metadata.get("clear_on_reset"))


@dataclass
class State:
    position: int
    """Absolute stream position of the next token (same for every row)."""
    row_start: torch.Tensor
    """(B,) long: positions before row_start[b] are invisible to row b."""
    layers: list[LayerState] = field(default_factory=list)
    """One LayerState per layer, bottom to top."""
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
                   layers=[LayerState() for _ in range(num_layers)])

    @property
    def batch_size(self) -> int:
        return self.row_start.shape[0]

    def detach(self) -> "State":
        """A copy whose tensors carry no gradient history (no backpropagation through time)."""
        return self._map(lambda t: t.detach())

    def clone(self) -> "State":
        """A detached copy in memory of its own (the kNN stores shared, as by every State of one
        stream): what a loop carries to the next step when the forward's outputs live in memory
        that the next step overwrites (CUDA-graph replays, memlm.compile_modes)."""
        return self._map(lambda t: t.detach().clone())

    def to(self, device: torch.device | str) -> "State":
        return self._map(lambda t: t.to(device))

    def mark_static(self) -> "State":
        """Mark every tensor of the layers static for torch.compile (torch._dynamo.mark_static),
        before each compiled call; returns self. A memory longer than a segment fills over several
        steps, and from its second length on dynamo would compile with the length symbolic
        (automatic dynamic shapes), so the steady state, a full memory, would run a graph built
        for any length. Marked static, each length while filling is one graph and the full memory
        has its own (adaptive span too: its spans mask keys, they never change a memory's length).
        Applied by whoever compiles (Trainer, bench)."""
        for layer in self.layers:
            for t in layer.tensors().values():
                torch._dynamo.mark_static(t)
        return self

    def reset(self, mask: torch.Tensor) -> "State":
        """Forget the past of the rows where mask (B,) is True: they start a new document."""
        if mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        mask = mask.to(self.row_start.device)
        row_start = torch.where(mask, self.position, self.row_start)
        for store in self.stores.values():
            if not store.shared:  # knowledge memory belongs to no row: nothing to forget
                store.reset(mask)
        return State(self.position, row_start, [layer.forget_rows(mask) for layer in self.layers], masked=True,
                     stores=self.stores)

    def advanced(self, steps: int, layers: list[LayerState]) -> "State":
        """The state `steps` positions later, with these layer states (rows and stores as they are)."""
        return State(self.position + steps, self.row_start, layers, self.masked, self.stores)

    def _map(self, fn) -> "State":
        return State(self.position, fn(self.row_start), [layer.map(fn) for layer in self.layers], self.masked,
                     self.stores)

    def batch_key(self) -> tuple | None:
        """What States must share to be stacked into one batch (`cat`): the position, and each
        tensor's name, shape past the row dimension and dtype. None for a State with kNN stores
        (external memory written in place, one object per batch: not stacked)."""
        if self.stores:
            return None
        return (self.position, tuple((i, name, tuple(t.shape[1:]), t.dtype) for i, layer in enumerate(self.layers)
                                     for name, t in sorted(layer.tensors().items())))

    @classmethod
    def cat(cls, states: Sequence["State"]) -> "State":
        """The States' rows stacked into one State (they share `batch_key`): a forward over it
        gives each row what a forward over its own State gives (rows never mix)."""
        keys = {state.batch_key() for state in states}
        if None in keys or len(keys) != 1:
            raise ValueError("only States at one position with the same tensors and no kNN stores can be stacked")
        layers = [LayerState.from_tensors({name: torch.cat([s.layers[i].tensors()[name] for s in states])
                                           for name in first.tensors()})
                  for i, first in enumerate(states[0].layers)]
        return cls(states[0].position, torch.cat([s.row_start for s in states]), layers,
                   masked=any(s.masked for s in states))

    def rows(self) -> list["State"]:
        """One State per row (the inverse of `cat`); kNN stores cannot be split."""
        if self.stores:
            raise ValueError("a State with kNN stores cannot be split into rows")
        return [self._map(lambda t, b=b: t[b:b + 1]) for b in range(self.batch_size)]

    def state_dict(self) -> dict:
        """Tensors and the position, for a training checkpoint."""
        tensors = {"row_start": self.row_start}
        for i, layer in enumerate(self.layers):
            tensors.update({f"layers.{i}.{name}": t for name, t in layer.tensors().items()})
        return {"position": self.position, "num_layers": len(self.layers), "masked": self.masked,
                "stores": {i: store.state_dict() for i, store in self.stores.items() if not store.shared},
                "tensors": tensors}

    @classmethod
    def from_state_dict(cls, data: dict) -> "State":
        tensors = data["tensors"]
        fields: list[dict[str, torch.Tensor]] = [{} for _ in range(data["num_layers"])]
        for key, t in tensors.items():
            if key.startswith("layers."):
                _, index, name = key.split(".", 2)
                fields[int(index)][name] = t
        return cls(data["position"], tensors["row_start"], [LayerState.from_tensors(f) for f in fields],
                   data.get("masked", True))
