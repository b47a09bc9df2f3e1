"""Peer models behind memlm's model protocol, so memlm's own Trainer and evaluator train and score
them exactly as they do a `LanguageModel` (`memlm race`). Benchmark-only: x-transformers is never
a dependency of memlm and is imported only when such a model is built.

    config = PeerConfig(layers=12, width=512, heads=8, seq_len=512, memory=PeerMemory(length=512))
    model = XTransformersLM(config)              # x-transformers TransformerWrapper + Decoder, rotary
    state = model.init_state(batch_size)         # PeerState: XL memory (or, without memory, a token window)
    out = model(input_ids, targets, state)       # memlm.model.ModelOutput(logits, loss, aux_loss=0, state)
    state = out.state.detach().reset(mask)       # rows where mask is True forget their memory

What the Trainer reads of `model.config` (here a `PeerConfig`): seq_len, stateful,
memory.reset_at_document, validate() and to_dict(). Of the model: forward, init_state,
load_state, after_optimizer_step, spans, num_parameters, flops_per_token, estimate_mfu.

Transformer-XL memory ("Transformer-XL: Attentive Language Models Beyond a Fixed-Length
Context", arXiv 1901.02860) is x-transformers' own: `model(x, mems=..., return_mems=True)`
returns each layer's input hidden states of the last `memory.length` positions, detached (no
backpropagation through time). Forgetting a row (`reset`): x-transformers cannot drop one
row's memory, so the state keeps a key mask over the memory (`mem_masks`, x-transformers >= 2)
that hides the forgotten rows' memory until a whole segment has replaced it. With that mask a
reset row computes what a fresh state computes (rotary positions are relative). Where a version
of x-transformers lacks `mem_masks`, zeroing those rows' memory would be the approximation
(zero keys still take a share of the softmax), which is why it is not done here.

Without memory the state is only a generation cache: x-transformers' key/value cache cannot be
handed in and out, so the state keeps the last seq_len token ids and each call re-runs them
(a sliding window; exact while the stream fits in seq_len, otherwise every new token still sees
at least seq_len / 2 earlier ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.model import ModelOutput
from memlm.tasks import IGNORE
from memlm_bench.workloads import Shape, dense_flops_per_token

INSTALL_HINT = "pip install x-transformers"


@dataclass(frozen=True)
class TrainablePeer:
    description: str
    xl_memory: bool
    """Transformer-XL memory of seq_len (trained on streams), or none (random windows)."""


TRAINABLE_PEERS = {
    "x-transformers": TrainablePeer("x-transformers, rotary, no memory", xl_memory=False),
    "x-transformers-XL": TrainablePeer("x-transformers, rotary, XL memory = seq_len (streams, memory kept in "
                                       "evaluation)", xl_memory=True),
}
"""The peers memlm's Trainer trains through `XTransformersLM` (the peer contenders of `memlm race`), by
name. `memlm bench` times its own set of peers (memlm_bench.peers.PEERS)."""


class PeerMissing(ImportError):
    """A peer library is not installed (it is a benchmark-only extra, never a memlm dependency)."""


@dataclass
class PeerMemory:
    length: int = 0
    """XL memory: hidden states of this many earlier positions per layer (x-transformers max_mem_len); 0 = none."""
    reset_at_document: bool = True
    """Forget a stream's memory where a new document starts (at segment boundaries), as memlm's presets do."""
    train_reset: float = 0.0
    """Training only: each row also forgets its memory at a segment start with this probability
    (memlm's memory.train_reset, applied by the Trainer)."""


@dataclass
class PeerConfig:
    """The shape and memory of a peer model, with the attributes memlm's Trainer reads of a ModelConfig."""

    library: str = "x-transformers"
    layers: int = 12
    width: int = 512
    heads: int = 8
    seq_len: int = 512
    vocab_size: int = 257
    features: dict[str, Any] = field(default_factory=lambda: {"rotary_pos_emb": True})
    """x-transformers Decoder switches (memlm_bench.peers.SEED_FEATURES for the programme's choices)."""
    memory: PeerMemory = field(default_factory=PeerMemory)
    dropout: float = 0.0
    """x-transformers' emb_dropout, ff_dropout and attn_dropout (memlm_bench.peers.x_transformer)."""

    @property
    def stateful(self) -> bool:
        """Whether training carries a state between segments (streams instead of random windows)."""
        return self.memory.length > 0

    @classmethod
    def of(cls, shape: Shape, memory: int = 0, features: dict[str, Any] | None = None,
           dropout: float = 0.0, train_reset: float = 0.0) -> "PeerConfig":
        return cls(layers=shape.layers, width=shape.width, heads=shape.heads, seq_len=shape.seq_len,
                   vocab_size=shape.vocab_size, features=dict(features if features is not None else
                                                              {"rotary_pos_emb": True}),
                   memory=PeerMemory(length=memory, train_reset=train_reset), dropout=dropout)

    @property
    def shape(self) -> Shape:
        return Shape(0, self.seq_len, self.layers, self.width, self.heads, self.vocab_size)

    def validate(self) -> "PeerConfig":
        if self.library != "x-transformers":
            raise ValueError(f"peer library {self.library!r}: only x-transformers has an adapter")
        for name in ("layers", "width", "heads", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"peer {name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"peer width {self.width} is not a multiple of heads {self.heads}")
        if self.memory.length < 0:
            raise ValueError(f"peer memory.length must be >= 0, got {self.memory.length}")
        if not 0 <= self.memory.train_reset < 1:
            raise ValueError(f"peer memory.train_reset must be in [0, 1), got {self.memory.train_reset}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"peer dropout must be in [0, 1), got {self.dropout}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeerConfig":
        data = dict(data)
        data["memory"] = PeerMemory(**data.get("memory", {}))
        return cls(**data)


@dataclass
class PeerState:
    """What a peer model carries from one segment to the next (one batch of streams). x-transformers
    hands its memory around as per-layer hidden states, not as memlm's typed per-layer `State`, so
    the adapter keeps its own; it offers what the Trainer and evaluator call on a state (batch_size,
    detach, clone, to, reset, state_dict)."""

    position: int
    """Stream position of the next token (same for every row)."""
    rows: int
    mems: list[torch.Tensor] | None = None
    """XL memory: per layer (B, M, W) hidden states, detached; None before the first segment."""
    mem_mask: torch.Tensor | None = None
    """(B, M) bool, False where a row's memory is forgotten; None = all visible."""
    tokens: torch.Tensor | None = None
    """Without memory (generation cache): (B, C) the last C <= seq_len token ids."""
    token_mask: torch.Tensor | None = None
    """(B, C) bool, False where a row forgot those tokens; None = all visible."""

    @property
    def batch_size(self) -> int:
        return self.rows

    def _map(self, fn) -> "PeerState":
        def apply(value):
            if isinstance(value, list):
                return [fn(t) for t in value]
            return fn(value) if isinstance(value, torch.Tensor) else value
        return dataclasses.replace(self, **{f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def detach(self) -> "PeerState":
        return self._map(lambda t: t.detach())

    def clone(self) -> "PeerState":
        """A detached copy in memory of its own (what a loop in a CUDA-graph mode carries on)."""
        return self._map(lambda t: t.detach().clone())

    def to(self, device: torch.device | str) -> "PeerState":
        return self._map(lambda t: t.to(device))

    def reset(self, mask: torch.Tensor) -> "PeerState":
        """Forget the past of the rows where mask (B,) is True: they start a new document."""
        if mask.shape != (self.rows,):
            raise ValueError(f"reset mask must have shape ({self.rows},), got {tuple(mask.shape)}")
        keep = ~mask.bool()[:, None]  # (B, 1)

        def hide(visible: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
            if like is None:
                return None
            if visible is None:
                visible = torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
            return visible & keep.to(visible.device)

        return dataclasses.replace(self, mem_mask=hide(self.mem_mask, self.mems[0] if self.mems else None),
                                   token_mask=hide(self.token_mask, self.tokens))

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, data: dict) -> "PeerState":
        return cls(**data)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """The loss memlm's models return: mean cross-entropy in float32 over the targets (B, T), IGNORE
    (-100) skipped; None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def _import_x_transformers():
    try:
        import x_transformers
    except ImportError as error:
        raise PeerMissing(f"x-transformers is not installed ({error}); it is a benchmark-only extra, not a memlm "
                          f"dependency: {INSTALL_HINT}") from error
    return x_transformers


class XTransformersLM(nn.Module):
    """An x-transformers `TransformerWrapper` (built as memlm bench builds it, tied embedding, flash
    attention) that speaks memlm's model protocol."""

    def __init__(self, config: PeerConfig):
        super().__init__()
        self.config = config.validate()
        _import_x_transformers()
        from memlm_bench.peers import x_transformer
        self.net = x_transformer(config.shape, config.features, max_mem_len=config.memory.length,
                                 dropout=config.dropout)

    # ----- state ----------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> PeerState:
        return PeerState(0, batch_size)

    def load_state(self, data: dict, device: torch.device | str | None = None) -> PeerState:
        state = PeerState.from_state_dict(data)
        return state.to(device) if device is not None else state

    # ----- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                state: PeerState | None = None) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if state is not None and state.rows != input_ids.shape[0]:
            raise ValueError(f"state holds {state.rows} rows but input_ids has {input_ids.shape[0]}")
        if state is None:
            logits, new_state = self.net(input_ids), None  # (B, T, V)
        elif self.config.stateful:
            logits, new_state = self._with_memory(input_ids, state)
        else:
            logits, new_state = self._windowed(input_ids, state)
        aux_loss = torch.zeros((), device=input_ids.device)
        return ModelOutput(logits, lm_loss(logits, targets), aux_loss, new_state)

    def _with_memory(self, input_ids: torch.Tensor, state: PeerState) -> tuple[torch.Tensor, PeerState]:
        """One segment with the XL memory in the state; the memory returned is detached."""
        T = input_ids.shape[1]
        masks = None if state.mem_mask is None else [state.mem_mask] * len(state.mems)
        logits, mems = self.net(input_ids, mems=state.mems, mem_masks=masks, return_mems=True)  # (B, T, V)
        mem_mask = None
        if state.mem_mask is not None and T < mems[0].shape[1]:  # part of the masked memory is still there
            fresh = torch.ones(input_ids.shape, dtype=torch.bool, device=state.mem_mask.device)  # (B, T)
            mem_mask = torch.cat([state.mem_mask, fresh], dim=1)[:, -mems[0].shape[1]:]  # (B, M)
        return logits, PeerState(state.position + T, state.rows, mems, mem_mask)

    def _windowed(self, input_ids: torch.Tensor, state: PeerState) -> tuple[torch.Tensor, PeerState]:
        """Without memory: re-run the state's recent tokens before input_ids (a sliding window)."""
        limit, context, visible = self.config.seq_len, state.tokens, state.token_mask
        held = 0 if context is None else context.shape[1]
        chunks = [input_ids] if held + input_ids.shape[1] <= limit else input_ids.split(max(1, limit // 2), dim=1)
        pieces = []
        for chunk in chunks:
            n = chunk.shape[1]
            room = limit - n
            ctx = context[:, max(0, context.shape[1] - room):] if context is not None and room > 0 else None
            window = chunk if ctx is None else torch.cat([ctx, chunk], dim=1)  # (B, <= seq_len)
            mask = None
            if ctx is not None and visible is not None:
                mask = torch.cat([visible[:, max(0, visible.shape[1] - room):], torch.ones_like(chunk, dtype=torch.bool)], 1)
            pieces.append(self.net(window, mask=mask)[:, -n:])
            context = chunk if context is None else torch.cat([context, chunk], dim=1)[:, -limit:]
            if visible is not None:
                visible = torch.cat([visible, torch.ones_like(chunk, dtype=torch.bool)], dim=1)[:, -limit:]
        return torch.cat(pieces, dim=1), PeerState(state.position + input_ids.shape[1], state.rows,
                                                    tokens=context, token_mask=visible)

    # ----- hooks for the trainer --------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Nothing to keep in range."""

    def spans(self) -> None:
        """No adaptive span."""
        return None

    # ----- accounting -----------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the token (and position) tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= sum(m.weight.numel() for m in self.net.modules() if isinstance(m, nn.Embedding))
        return total

    def flops_per_token(self, context: int | None = None) -> float:
        """The PaLM / nanoGPT estimate memlm bench uses for peers: 6 x matmul weights + 12 x L x W x context."""
        return dense_flops_per_token(self.net, self.config.shape, context or self.config.seq_len)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, context: int | None = None) -> float:
        return tokens_per_second * self.flops_per_token(context) / peak_flops
