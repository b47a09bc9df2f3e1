"""The model config: its scalar fields, the sections of the non-memory parts, derived values and
the checks that span sections (memlm.config.memory holds the memory sections).

Every component kind is a string, so a config round-trips through JSON and TOML
(memlm.config.io). `validate` runs at build time and raises `ConfigError` naming the field, the
bad value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm.config.checks import ConfigError, choice, positive_int
from memlm.config.memory import MemoryConfig

POSITION_KINDS = ("none", "learned", "sinusoidal", "rope", "xpos", "t5", "tupe")
NORM_KINDS = ("layernorm", "rmsnorm", "scalenorm")
NORM_PLACEMENTS = ("pre", "post")
FEEDFORWARD_KINDS = ("gelu", "relu2", "swiglu", "geglu", "none")
BACKENDS = ("auto", "eager", "sdpa", "flex")


@dataclass
class AttentionConfig:
    heads: int = 8
    """Number of query heads."""
    kv_heads: int | None = None
    """Key/value heads: None = heads (multi-head), 1 = multi-query (arXiv 1911.02150), else grouped."""
    head_dim: int | None = None
    """Width of one head; None = model width / heads."""
    qk_norm: bool = False
    """QK-norm (arXiv 2010.04245): L2-normalise q and k per head, scale the scores by a learnable g."""
    qk_norm_scale: float | None = None
    """Initial g for QK-norm; None = log2(L^2 - L) with L = seq_len, as in the paper."""
    dropout: float = 0.0
    """Dropout on the attention probabilities (training only)."""
    forgetful: float = 0.0
    """Forgetful causal masking (arXiv 2210.13432): max mask ratio eta; 0 = off. Training only."""
    backend: str = "auto"
    """Attention kernel: auto, eager (reference), sdpa, flex."""


@dataclass
class PositionConfig:
    kind: str = "rope"
    """Position scheme: none, learned, sinusoidal, rope, xpos, t5, tupe."""
    rope_base: float = 10000.0
    """RoPE / xPos frequency base."""
    rope_dim: int | None = None
    """Head dimensions rotated by RoPE / xPos; None = the whole head."""
    xpos_gamma: float = 0.4
    """xPos decay parameter gamma (arXiv 2212.10554)."""
    xpos_scale_base: float = 512.0
    """xPos scale base: the decay exponent is distance / scale_base."""
    t5_buckets: int = 32
    """T5 relative bias: number of log-spaced distance buckets."""
    t5_max_distance: int = 128
    """T5 relative bias: distances from here on share the last bucket."""
    t5_shared: bool = True
    """T5 relative bias: one table shared by all layers (True) or one per layer."""
    tupe_t5: bool = False
    """TUPE-R: add the T5 relative bias to TUPE's untied positional term."""


@dataclass
class NormConfig:
    kind: str = "layernorm"
    """Normalisation: layernorm, rmsnorm, scalenorm (arXiv 1910.05895)."""
    placement: str = "pre"
    """pre (normalise the sublayer input) or post (normalise after the residual add)."""
    final: bool = True
    """Normalise the last hidden state before the output head (pre-norm only)."""
    eps: float = 1e-5
    """Numerical epsilon of the norm."""


@dataclass
class FeedForwardConfig:
    kind: str = "gelu"
    """Feed-forward: gelu, relu2 (squared ReLU, arXiv 2109.08668), swiglu, geglu, none."""
    mult: float = 4.0
    """Hidden width = mult * model width (gated kinds use 2/3 of it, rounded to 8)."""
    dropout: float = 0.0
    """Dropout on the hidden activations, before the output projection (training only; where
    x-transformers' ff_dropout acts, besides the model's dropout on the residual branches)."""


@dataclass
class ModelConfig:
    vocab_size: int = 257
    """Vocabulary size (bytes 0..255 plus end-of-document 256)."""
    width: int = 512
    """Model width (d_model)."""
    layers: int = 12
    """Number of transformer blocks."""
    seq_len: int = 512
    """Training segment length."""
    max_positions: int | None = None
    """Largest position a learned or TUPE table covers; None = seq_len."""
    bias: bool = True
    """Biases in linear layers and norms; False = bias-free everywhere (Cramming, arXiv 2212.14034)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    dropout: float = 0.0
    """Dropout on embeddings and residual branches (training only)."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * layers)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    feedforward: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    # ----- derived values -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.width // self.attention.heads

    @property
    def kv_heads(self) -> int:
        return self.attention.kv_heads or self.attention.heads

    @property
    def positions_limit(self) -> int:
        """Rows of a learned or TUPE position table: max_positions, else seq_len for learned
        positions and the widest window a layer attends for TUPE (`attention_window`)."""
        if self.max_positions:
            return self.max_positions
        return self.attention_window if self.position.kind == "tupe" else self.seq_len

    @property
    def attention_window(self) -> int:
        """Most keys with a position that a layer's query can see on a stream: the segment plus
        the longest memory (training or evaluation) plus the compressed memory."""
        c = self.memory.compressive
        memory = max(self.memory_lengths(training=True) + self.memory_lengths(training=False))
        return self.seq_len + memory + (c.length if c.rate else 0)

    @property
    def recurrent(self) -> bool:
        """Whether the state carries hidden states between segments (any recurrent memory)."""
        return self.memory.carries_hidden_states()

    @property
    def stateful(self) -> bool:
        """Whether training and evaluation should carry a state between segments (streams)."""
        return self.recurrent or self.memory.tokens.recurrent

    @property
    def span_max(self) -> int:
        """Largest adaptive span: memory.adaptive_span.max or seq_len + the longest memory."""
        return self.memory.adaptive_span.max or self.seq_len + max(self.memory_lengths(training=False))

    def memory_lengths(self, training: bool = True) -> list[int]:
        """Memory length of each layer, bottom to top, for training or evaluation mode."""
        return self.memory.xl.lengths_by_layer(self.layers, training)

    # ----- validation -----------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError for the first invalid field; return self when all is well."""
        a, p, n, f = self.attention, self.position, self.norm, self.feedforward
        for name, value in [("vocab_size", self.vocab_size), ("width", self.width),
                            ("layers", self.layers), ("seq_len", self.seq_len),
                            ("attention.heads", a.heads)]:
            positive_int(name, value)
        choice("position.kind", p.kind, POSITION_KINDS)
        choice("norm.kind", n.kind, NORM_KINDS)
        choice("norm.placement", n.placement, NORM_PLACEMENTS)
        choice("feedforward.kind", f.kind, FEEDFORWARD_KINDS)
        choice("attention.backend", a.backend, BACKENDS)
        if a.head_dim is None and self.width % a.heads:
            raise ConfigError("attention.heads", a.heads,
                              f"must divide width={self.width} (or set attention.head_dim)")
        if a.head_dim is not None:
            positive_int("attention.head_dim", a.head_dim)
        if a.kv_heads is not None:
            positive_int("attention.kv_heads", a.kv_heads)
            if a.heads % a.kv_heads:
                raise ConfigError("attention.kv_heads", a.kv_heads,
                                  f"must divide attention.heads={a.heads}")
        for name, value in [("dropout", self.dropout), ("attention.dropout", a.dropout),
                            ("attention.forgetful", a.forgetful), ("feedforward.dropout", self.feedforward.dropout)]:
            if not 0.0 <= value < 1.0:
                raise ConfigError(name, value, "must lie in [0, 1)")
        if a.backend == "flex" and a.dropout > 0:
            raise ConfigError("attention.dropout", a.dropout,
                              "the flex backend has no attention dropout; use 0 or backend eager/sdpa")
        if a.qk_norm_scale is not None and a.qk_norm_scale <= 0:
            raise ConfigError("attention.qk_norm_scale", a.qk_norm_scale, "must be > 0")
        if self.max_positions is not None:
            positive_int("max_positions", self.max_positions)
        if p.kind in ("rope", "xpos"):
            rope_dim = p.rope_dim if p.rope_dim is not None else self.head_dim
            if rope_dim <= 0 or rope_dim % 2 or rope_dim > self.head_dim:
                raise ConfigError("position.rope_dim", p.rope_dim,
                                  f"must be even and in [2, head_dim={self.head_dim}]")
            if p.rope_base <= 1:
                raise ConfigError("position.rope_base", p.rope_base, "must be > 1")
        if p.kind == "xpos":
            if p.xpos_gamma <= 0:
                raise ConfigError("position.xpos_gamma", p.xpos_gamma, "must be > 0")
            if p.xpos_scale_base <= 0:
                raise ConfigError("position.xpos_scale_base", p.xpos_scale_base, "must be > 0")
        if p.kind in ("t5", "tupe"):
            positive_int("position.t5_buckets", p.t5_buckets)
            if p.t5_max_distance <= p.t5_buckets // 2:
                raise ConfigError("position.t5_max_distance", p.t5_max_distance,
                                  f"must exceed t5_buckets / 2 = {p.t5_buckets // 2}")
        if p.tupe_t5 and p.kind != "tupe":
            raise ConfigError("position.tupe_t5", p.tupe_t5, "only applies with position.kind='tupe'")
        if f.mult <= 0:
            raise ConfigError("feedforward.mult", f.mult, "must be > 0")
        self._validate_memory()
        if n.eps <= 0:
            raise ConfigError("norm.eps", n.eps, "must be > 0")
        if self.init_std <= 0:
            raise ConfigError("init_std", self.init_std, "must be > 0")
        return self

    def _validate_memory(self) -> None:
        """The memory sections, then the checks between memory and positions."""
        self.memory.validate(self)
        if (self.recurrent and self.position.kind == "tupe" and self.max_positions is not None
                and self.max_positions < self.attention_window):
            raise ConfigError("max_positions", self.max_positions,
                              f"TUPE numbers positions in the window a layer attends; with this memory it "
                              f"spans up to {self.attention_window} positions (seq_len + memory + compressed "
                              f"memory): use at least that, or None")
        if self.recurrent and self.position.kind == "learned":
            raise ConfigError("position.kind", "learned",
                              "a learned absolute table cannot follow a stream past max_positions; "
                              "with recurrent memory use rope, xpos, t5, tupe, sinusoidal or none")

    # ----- serialisation (memlm.config.io) ------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from memlm.config.io import to_dict
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        from memlm.config.io import from_dict
        return from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (.json) or TOML (.toml; None values are left out)."""
        from memlm.config.io import save
        save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        from memlm.config.io import load
        return load(path)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with dotted overrides applied (`{"attention.kv_heads": 1}`) and validated."""
        from memlm.config.overrides import apply_overrides
        return apply_overrides(self, overrides)

    # ----- presets for QK-norm --------------------------------------------------------
    def qk_norm_init(self) -> float:
        if self.attention.qk_norm_scale is not None:
            return self.attention.qk_norm_scale
        length = max(self.seq_len, 2)
        return math.log2(length * length - length)


