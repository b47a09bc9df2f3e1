"""Model configuration: nested dataclasses, presets, validation and dotted overrides.

Every component kind is a string, so a config round-trips through JSON and TOML
(`to_dict` / `from_dict`, `save` / `load`). `validate` runs at build time and raises
`ConfigError` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSITION_KINDS = ("none", "learned", "sinusoidal", "rope", "xpos", "t5", "tupe")
NORM_KINDS = ("layernorm", "rmsnorm", "scalenorm")
NORM_PLACEMENTS = ("pre", "post")
FEEDFORWARD_KINDS = ("gelu", "relu2", "swiglu", "geglu", "none")
BACKENDS = ("auto", "eager", "sdpa", "flex")
MEMORY_SCHEDULES = ("constant", "linear")
FEEDBACK_MODES = ("none", "memory", "add")
COMPRESS_FNS = ("max", "mean", "conv", "most_used")
KNN_BACKENDS = ("exact", "faiss")
KNN_COMBINE = ("gate", "joint")
KNN_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """An invalid configuration value or an impossible combination of values."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name = field_name
        super().__init__(f"invalid config: {field_name}={value!r}; {allowed}")


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
class MemoryConfig:
    length: int = 0
    """Transformer-XL memory (arXiv 1901.02860): earlier positions each layer attends to; 0 = off."""
    lengths: list[int] | None = None
    """Memory length per layer, bottom to top; overrides length and schedule (arXiv 2007.03356)."""
    schedule: str = "constant"
    """Lengths by depth when `lengths` is unset: constant, or linear from min_length (bottom) to length (top)."""
    min_length: int = 0
    """Memory length of the bottom layer for the linear schedule."""
    eval_multiplier: float = 1.0
    """Memory lengths are multiplied by this in evaluation mode (longer memory at test time, as
    Transformer-XL evaluates). With RoPE it hurts: distances beyond those trained are new to the
    model (H200, test bpb: xl2-knn-small 0.642 at 1x, 2.19 at 2x; the same with memory 512 0.669
    at 1x, 0.793 at 2x, 3.99 at 4x). Train with the longer memory instead, or use xPos, which
    takes it (H200: xl2-knn-small with xPos 0.647 at 1x, 0.639 at 2x, 0.638 at 4x; the preset
    xl4-xpos-knn-small evaluates at 2x). `memlm eval --memory-multiplier` sets it for a trained
    model."""
    feedback: str = "none"
    """Layerwise feedback: none; memory (layer i's memory is the previous segments' output of layer
    i+1, the top layer's its own output); add (add the previous segment's output of layer i+1 to
    layer i's input, position by position)."""
    persistent: int = 0
    """Persistent memory (arXiv 1907.01470): learned key/value vectors per layer and key/value head,
    without positions, always visible; 0 = off. Set feedforward.kind=none to let them replace it."""
    reset_at_document: bool = True
    """Forget a stream's memory where a new document starts (at segment boundaries); False = carry it
    across documents."""
    train_reset: float = 0.0
    """Training only: the probability that a batch row also forgets its memory (recurrent, kNN, all
    of its state) at the start of any segment, so the model learns to work from an empty memory,
    which is how evaluation streams and generation begin. 0 = only at documents."""
    adaptive_span: bool = False
    """Adaptive attention span (arXiv 1905.07799): a learned span per head with a soft ramp."""
    span_max: int | None = None
    """Largest span a head may learn; None = seq_len + the largest memory length."""
    span_ramp: int = 32
    """Width R of the soft ramp at the end of a span."""
    span_init: float = 0.0
    """Initial span as a fraction of span_max."""
    span_penalty: float = 2e-6
    """Weight of the span penalty (mean learned span in positions, summed over layers) in aux_loss."""
    compress_rate: int = 0
    """Compressive memory (arXiv 1911.05507): memories leaving the recurrent memory are compressed
    by this rate into a compressed memory; 0 = off."""
    compress_length: int = 0
    """Compressed memory slots per layer."""
    compress_fn: str = "conv"
    """Compression function: max, mean, conv (learned 1D convolution), most_used."""
    compress_loss: float = 1.0
    """Weight of the attention-reconstruction loss (trains only the compressor) in aux_loss."""
    tokens: int = 0
    """Memory tokens (Memory Transformer, arXiv 2006.11527): M learned embeddings read before every
    segment, seen by all its tokens; 0 = off. Combine with recurrent and kNN memory, which hold the
    segments' token positions only (memlm.memory.tokens)."""
    knn_layers: list[int] | None = None
    """kNN memory (Memorizing Transformers, arXiv 2203.08913): layers (0-based) whose queries also
    attend to their top-k keys/values retrieved from an external store of the stream's past."""
    knn_k: int = 32
    """kNN memory: retrieved keys/values per query."""
    knn_capacity: int = 65536
    """kNN memory: entries kept per stream (row) and key/value head; the oldest are evicted first."""
    knn_backend: str = "exact"
    """kNN memory store: exact (device tensors, matmul + top-k) or faiss (faiss-cpu index)."""
    knn_dtype: str = "float32"
    """kNN memory, exact store: precision of the stored keys/values and of the search (float32, or
    bfloat16: half the memory and about 0.36x the search time on an H200, 6.3 against 17.5 ms at
    32 rows x 65,536 keys and 32 x 4,096 queries; near-equal scores may rank differently). The
    faiss store holds float32."""
    knn_combine: str = "gate"
    """How retrieved and local attention combine: gate (learned per-head sigmoid gate, as in the
    paper) or joint (one softmax over local and retrieved keys)."""
    knn_straight_through: bool = False
    """Pass the gradient of the retrieved keys and values straight through to the query."""
    tokens_recurrent: bool = False
    """Recurrent memory tokens (as in the Recurrent Memory Transformer, arXiv 2207.06881): M write
    tokens after each segment; their outputs are the next segment's memory tokens."""


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
        m = self.memory
        memory = max(self.memory_lengths(training=True) + self.memory_lengths(training=False))
        return self.seq_len + memory + (m.compress_length if m.compress_rate else 0)

    @property
    def recurrent(self) -> bool:
        """Whether the state carries hidden states between segments (any recurrent memory)."""
        m = self.memory
        return bool(m.lengths and any(m.lengths)) or m.length > 0 or m.feedback != "none" or bool(m.knn_layers)

    @property
    def stateful(self) -> bool:
        """Whether training and evaluation should carry a state between segments (streams)."""
        return self.recurrent or self.memory.tokens_recurrent

    @property
    def span_max(self) -> int:
        """Largest adaptive span: memory.span_max or seq_len + the longest memory."""
        return self.memory.span_max or self.seq_len + max(self.memory_lengths(training=False))

    def memory_lengths(self, training: bool = True) -> list[int]:
        """Memory length of each layer, bottom to top, for training or evaluation mode."""
        m = self.memory
        if m.lengths is not None:
            lengths = list(m.lengths)
        elif m.schedule == "linear" and self.layers > 1:
            lengths = [round(m.min_length + (m.length - m.min_length) * i / (self.layers - 1))
                       for i in range(self.layers)]
        else:
            lengths = [m.length] * self.layers
        if not training and m.eval_multiplier != 1.0:
            lengths = [int(round(n * m.eval_multiplier)) for n in lengths]
        return lengths

    # ----- validation -----------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError for the first invalid field; return self when all is well."""
        a, p, n, f = self.attention, self.position, self.norm, self.feedforward
        for name, value in [("vocab_size", self.vocab_size), ("width", self.width),
                            ("layers", self.layers), ("seq_len", self.seq_len),
                            ("attention.heads", a.heads)]:
            _positive_int(name, value)
        _choice("position.kind", p.kind, POSITION_KINDS)
        _choice("norm.kind", n.kind, NORM_KINDS)
        _choice("norm.placement", n.placement, NORM_PLACEMENTS)
        _choice("feedforward.kind", f.kind, FEEDFORWARD_KINDS)
        _choice("attention.backend", a.backend, BACKENDS)
        if a.head_dim is None and self.width % a.heads:
            raise ConfigError("attention.heads", a.heads,
                              f"must divide width={self.width} (or set attention.head_dim)")
        if a.head_dim is not None:
            _positive_int("attention.head_dim", a.head_dim)
        if a.kv_heads is not None:
            _positive_int("attention.kv_heads", a.kv_heads)
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
            _positive_int("max_positions", self.max_positions)
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
            _positive_int("position.t5_buckets", p.t5_buckets)
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
        m = self.memory
        _choice("memory.schedule", m.schedule, MEMORY_SCHEDULES)
        _choice("memory.feedback", m.feedback, FEEDBACK_MODES)
        for name, value in [("memory.length", m.length), ("memory.min_length", m.min_length),
                            ("memory.persistent", m.persistent)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, value, "must be an integer >= 0")
        if m.lengths is not None:
            if (not isinstance(m.lengths, (list, tuple)) or len(m.lengths) != self.layers
                    or any(not isinstance(n, int) or n < 0 for n in m.lengths)):
                raise ConfigError("memory.lengths", m.lengths,
                                  f"must be a list of {self.layers} integers >= 0, one per layer")
        if m.schedule == "linear" and m.min_length > m.length:
            raise ConfigError("memory.min_length", m.min_length, f"must not exceed memory.length={m.length}")
        if m.feedback == "memory" and not any(self.memory_lengths()):
            raise ConfigError("memory.feedback", m.feedback,
                              "feedback into memory needs memory.length (or lengths) > 0")
        if not 0.0 <= m.train_reset < 1.0:
            raise ConfigError("memory.train_reset", m.train_reset, "must lie in [0, 1)")
        if m.eval_multiplier <= 0:
            raise ConfigError("memory.eval_multiplier", m.eval_multiplier, "must be > 0")
        if m.knn_layers is not None:
            if (not isinstance(m.knn_layers, (list, tuple)) or len(set(m.knn_layers)) != len(m.knn_layers)
                    or any(not isinstance(i, int) or not 0 <= i < self.layers for i in m.knn_layers)):
                raise ConfigError("memory.knn_layers", m.knn_layers,
                                  f"must be a list of distinct layer indices in [0, {self.layers - 1}]")
            _positive_int("memory.knn_k", m.knn_k)
            _positive_int("memory.knn_capacity", m.knn_capacity)
            _choice("memory.knn_backend", m.knn_backend, KNN_BACKENDS)
            _choice("memory.knn_combine", m.knn_combine, KNN_COMBINE)
            _choice("memory.knn_dtype", m.knn_dtype, KNN_DTYPES)
            if m.knn_backend == "faiss" and m.knn_dtype != "float32":
                raise ConfigError("memory.knn_dtype", m.knn_dtype, "the faiss store holds float32")
        if m.adaptive_span:
            if m.span_max is not None:
                _positive_int("memory.span_max", m.span_max)
            _positive_int("memory.span_ramp", m.span_ramp)
            if not 0.0 <= m.span_init <= 1.0:
                raise ConfigError("memory.span_init", m.span_init, "must lie in [0, 1]")
            if m.span_penalty < 0:
                raise ConfigError("memory.span_penalty", m.span_penalty, "must be >= 0")
        _choice("memory.compress_fn", m.compress_fn, COMPRESS_FNS)
        if m.compress_rate:
            _positive_int("memory.compress_rate", m.compress_rate)
            _positive_int("memory.compress_length", m.compress_length)
            if not any(self.memory_lengths()):
                raise ConfigError("memory.compress_rate", m.compress_rate,
                                  "compression needs a recurrent memory (memory.length > 0) to compress")
            if m.feedback == "add":
                raise ConfigError("memory.compress_rate", m.compress_rate,
                                  "compressive memory compresses the recurrent memory; feedback=add has none")
        self._validate_memory_tokens()
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

    def _validate_memory_tokens(self) -> None:
        m = self.memory
        if not isinstance(m.tokens, int) or isinstance(m.tokens, bool) or m.tokens < 0:
            raise ConfigError("memory.tokens", m.tokens, "must be an integer >= 0")
        if not isinstance(m.tokens_recurrent, bool):
            raise ConfigError("memory.tokens_recurrent", m.tokens_recurrent, "must be true or false")
        if m.tokens_recurrent and not m.tokens:
            raise ConfigError("memory.tokens_recurrent", m.tokens_recurrent, "needs memory.tokens > 0")
        if m.tokens and self.position.kind == "tupe":
            raise ConfigError("position.kind", "tupe",
                              "TUPE's untied term needs an absolute position for every query and key, "
                              "and memory tokens have none; with memory.tokens use rope, xpos, t5, "
                              "learned, sinusoidal or none")

    # ----- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, prefix="")

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (.json) or TOML (.toml; None values are left out)."""
        path = Path(path)
        if path.suffix == ".toml":
            path.write_text(to_toml(self.to_dict()))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.suffix == ".toml":
            return cls.from_dict(tomllib.loads(path.read_text()))
        return cls.from_dict(json.loads(path.read_text()))

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with dotted overrides applied (`{"attention.kv_heads": 1}`) and validated."""
        return apply_overrides(self, overrides)

    # ----- presets for QK-norm --------------------------------------------------------
    def qk_norm_init(self) -> float:
        if self.attention.qk_norm_scale is not None:
            return self.attention.qk_norm_scale
        length = max(self.seq_len, 2)
        return math.log2(length * length - length)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, value, "must be a positive integer")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, f"allowed: {', '.join(allowed)}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", data, "must be a table/dict")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(prefix + key, value, f"unknown field; known: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, prefix + key + ".")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for nested config dicts of scalars (None values are left out)."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


# ----- overrides ----------------------------------------------------------------------

def apply_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """Apply `{"attention.kv_heads": 1, "layers": 2}` (also `attention__kv_heads`) to a copy.

    Strings are converted to the field's type, so CLI text works too ("1", "true", "none").
    """
    data = config.to_dict()
    for raw_key, value in overrides.items():
        path = raw_key.replace("__", ".").split(".")
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _set_path(data, path + [sub_key], sub_value, ModelConfig)
        else:
            _set_path(data, path, value, ModelConfig)
    return ModelConfig.from_dict(data).validate()


def _set_path(data: dict, path: list[str], value: Any, cls: type) -> None:
    dotted = ".".join(path)
    node, node_cls = data, cls
    for i, key in enumerate(path):
        hints = typing.get_type_hints(node_cls)
        if key not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(node_cls)))
            raise ConfigError(dotted, value, f"unknown field; known at this level: {known}")
        if i == len(path) - 1:
            node[key] = _coerce(dotted, value, hints[key])
        else:
            if not dataclasses.is_dataclass(hints[key]):
                raise ConfigError(dotted, value, f"{'.'.join(path[:i + 1])} is not a section")
            node, node_cls = node[key], hints[key]


def _coerce(name: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and value.lower() in ("none", "null"):
        return None
    for option in options:
        if typing.get_origin(option) is list:
            try:
                return [int(v) for v in value.strip("[] ").split(",") if v.strip()]
            except ValueError:
                continue
        if option is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
        elif option in (int, float):
            try:
                return option(value)
            except ValueError:
                continue
        elif option is str:
            return value
    raise ConfigError(name, value, f"expected {hint}")


# ----- presets ------------------------------------------------------------------------

SIZES = {
    # name: (layers, width, heads, seq_len)
    "tiny": dict(layers=4, width=128, heads=4, seq_len=256),
    "small": dict(layers=12, width=512, heads=8, seq_len=512),
    "base": dict(layers=12, width=768, heads=12, seq_len=1024),
}


def _vanilla(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """GPT-2-style baseline: learned absolute positions, LayerNorm, GELU, biases, multi-head."""
    return ModelConfig(
        width=width, layers=layers, seq_len=seq_len, bias=True,
        attention=AttentionConfig(heads=heads),
        position=PositionConfig(kind="learned"),
        norm=NormConfig(kind="layernorm"),
        feedforward=FeedForwardConfig(kind="gelu"),
    )


def _seed(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """The programme's choices: bias-free, ScaleNorm, QK-norm, squared ReLU, multi-query, RoPE."""
    return ModelConfig(
        width=width, layers=layers, seq_len=seq_len, bias=False,
        attention=AttentionConfig(heads=heads, kv_heads=1, qk_norm=True),
        position=PositionConfig(kind="rope"),
        norm=NormConfig(kind="scalenorm"),
        feedforward=FeedForwardConfig(kind="relu2"),
    )


def _seed_mem(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed plus the memory combination the programme proposes: recurrence with layerwise
    feedback, per-layer lengths learned by adaptive span, compressive and persistent memory."""
    config = _seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(length=seq_len, feedback="memory", adaptive_span=True,
                                 span_init=0.5, compress_rate=4, compress_length=seq_len // 4,
                                 persistent=16)
    return config


def _xl(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed plus plain Transformer-XL recurrence with memory = segment length."""
    config = _seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(length=seq_len)
    return config


def _xl_top(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-xl with a long memory (one segment) only in the top sixth of the layers and a short one
    (a quarter segment) below, after "Do Transformers Need Deep Long-Range Memory?" (Rae & Razavi,
    arXiv 2007.03356), which keeps long-range memories in a few upper layers and gives the others
    a short-range memory. At 12 layers it holds 2.7x fewer memories than seed-xl."""
    config = _xl(layers, width, heads, seq_len)
    top = max(1, layers // 6)
    config.memory = MemoryConfig(lengths=[seq_len // 4] * (layers - top) + [seq_len] * top)
    return config


def _knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed plus one kNN memory layer ("Memorizing Transformers", Wu et al., arXiv 2203.08913):
    at about 3/4 depth, never the top layer (index 9 of 12, 2 of 4; the paper puts its one kNN
    layer near the top of the stack), 65,536 entries per row in the exact store (bfloat16 keys
    and values: the search bounds this layer's cost), top-32 retrieval and the paper's learned
    per-head gate between local and retrieved attention."""
    config = _seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(knn_layers=[max(0, min(layers - 2, 3 * layers // 4))], knn_k=32,
                                 knn_capacity=65536, knn_backend="exact", knn_combine="gate",
                                 knn_dtype="bfloat16")
    return config


def _xl_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-knn plus Transformer-XL recurrence of one segment in every layer: the setting of
    Memorizing Transformers (arXiv 2203.08913), whose local attention is an XL cache and whose kNN
    layer searches the older past."""
    config = _knn(layers, width, heads, seq_len)
    config.memory.length = seq_len
    return config


def _xl2_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """The best memory model of the 14:37 UTC race (BENCHMARKS.md): seed-xl-knn's memory with a
    Transformer-XL memory of two segments (Dai et al., arXiv 1901.02860), on GPT-2-style blocks as
    x-transformers builds them (LayerNorm, GELU, biases, a key/value head per query head, no QK-norm,
    RoPE on half of each head), with dropout on embeddings and residual branches (0.2), the
    feed-forward hidden units (0.2) and the attention probabilities (0.1), and memory.train_reset
    0.1. The dropout suits corpora of ~10M tokens trained for many epochs; lower it for large ones.
    Departure from the seed family: its blocks are not the programme's (on the stdlib corpus they
    cost 1.7% bpb in the race)."""
    config = _vanilla(layers, width, heads, seq_len)
    config.position = PositionConfig(kind="rope", rope_dim=(width // heads) // 2)
    config.attention.kv_heads = heads
    config.dropout, config.feedforward.dropout, config.attention.dropout = 0.2, 0.2, 0.1
    config.memory = _knn(layers, width, heads, seq_len).memory
    config.memory.length, config.memory.train_reset = 2 * seq_len, 0.1
    return config


def _xl4_xpos_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """xl2-knn with xPos ("A Length-Extrapolatable Transformer", Sun et al., arXiv 2212.10554) in
    place of RoPE on the same half of each head, a Transformer-XL memory of four segments, and
    twice that memory in evaluation (memory.eval_multiplier 2, as Transformer-XL, arXiv 1901.02860,
    tests with a longer memory than it trains with). xPos's decay keeps distances beyond those
    trained usable, where RoPE's break (BENCHMARKS.md, 16:32 UTC): 4.8% and 5.0% below
    x-transformers-XL in test bpb in two 10-minute races on the stdlib corpus. It trains about 25%
    slower than xl2-knn; the attention spans five segments."""
    config = _xl2_knn(layers, width, heads, seq_len)
    config.position.kind = "xpos"
    config.memory.length, config.memory.eval_multiplier = 4 * seq_len, 2.0
    return config


def _depth_xpos_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """xl4-xpos-knn with memory lengths that grow with depth: one segment of XL memory in the lower
    half of the layers, four in the upper half (twice each in evaluation). "Do Transformers Need Deep
    Long-Range Memory?" (Rae and Razavi, arXiv 2007.03356) finds long-range memory needed in only a
    few layers, best the upper ones; the paper keeps it in fewer layers than half and gives the
    others a short memory, as here. The lower layers' attention spans two segments instead of five,
    and the small model trains on 23% more tokens a second than xl4-xpos-knn-small (331k against
    269k on an H200). In the 10-minute race of 17:57 UTC (BENCHMARKS.md) it scored 5.5% below
    x-transformers-XL in test bpb, the best of the race."""
    config = _xl4_xpos_knn(layers, width, heads, seq_len)
    shallow = layers // 2
    config.memory.lengths = [seq_len] * shallow + [4 * seq_len] * (layers - shallow)
    return config


def _compressive(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-xl plus compressive memory ("Compressive Transformers for Long-Range Sequence
    Modelling", Rae et al., arXiv 1911.05507): memories leaving the segment-long XL memory are
    compressed at rate 4 into seq_len / 4 slots by a learned 1D convolution trained with the
    attention-reconstruction loss, the paper's best compression function."""
    config = _xl(layers, width, heads, seq_len)
    config.memory = MemoryConfig(length=seq_len, compress_rate=4, compress_length=seq_len // 4,
                                 compress_fn="conv")
    return config


PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {}
for _size, _shape in SIZES.items():
    PRESETS[f"vanilla-{_size}"] = (lambda s=_shape: _vanilla(**s))
    PRESETS[f"seed-{_size}"] = (lambda s=_shape: _seed(**s))
    PRESETS[f"seed-xl-{_size}"] = (lambda s=_shape: _xl(**s))
    PRESETS[f"seed-xl-top-{_size}"] = (lambda s=_shape: _xl_top(**s))
    PRESETS[f"seed-mem-{_size}"] = (lambda s=_shape: _seed_mem(**s))
    PRESETS[f"seed-compressive-{_size}"] = (lambda s=_shape: _compressive(**s))
    PRESETS[f"seed-knn-{_size}"] = (lambda s=_shape: _knn(**s))
    PRESETS[f"seed-xl-knn-{_size}"] = (lambda s=_shape: _xl_knn(**s))
    PRESETS[f"xl2-knn-{_size}"] = (lambda s=_shape: _xl2_knn(**s))
    PRESETS[f"xl4-xpos-knn-{_size}"] = (lambda s=_shape: _xl4_xpos_knn(**s))
    PRESETS[f"depth-xpos-knn-{_size}"] = (lambda s=_shape: _depth_xpos_knn(**s))

DESCRIPTIONS = {
    "vanilla": "GPT-2-style baseline: learned positions, LayerNorm, GELU, biases, multi-head",
    "seed": "bias-free, ScaleNorm, QK-norm, squared ReLU, multi-query, RoPE",
    "seed-xl": "seed + Transformer-XL recurrent memory of one segment",
    "seed-xl-top": "seed-xl with long memory only in the top sixth of the layers, a quarter segment below",
    "seed-mem": "seed + feedback memory, adaptive span, compressive and persistent memory",
    "seed-compressive": "seed-xl + compressive memory (rate 4, seq_len / 4 slots, learned conv)",
    "seed-knn": "seed + one kNN memory layer at 3/4 depth (65,536 bf16 entries per row, exact, top-32, gated)",
    "seed-xl-knn": "seed-knn + Transformer-XL recurrent memory of one segment (as in Memorizing Transformers)",
    "xl2-knn": "GPT-2-style blocks, RoPE on half of each head, XL memory of two segments, "
               "one kNN layer, dropout 0.2/0.2/0.1, train_reset 0.1",
    "xl4-xpos-knn": "xl2-knn with xPos instead of RoPE and XL memory of four segments, twice that in evaluation",
    "depth-xpos-knn": "the race's best: xl4-xpos-knn with memory that grows with depth (one segment in the "
                      "lower half of the layers, four above)",
}


def describe(name: str) -> str:
    """One line on what a preset turns on."""
    return DESCRIPTIONS[name.rsplit("-", 1)[0]]


def presets() -> list[str]:
    """The preset names, in a stable order."""
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError("preset", name, f"allowed: {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve(preset_or_config: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A validated config from a preset name or a config, with dotted overrides applied."""
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, ModelConfig):
        config = preset_or_config
    else:
        raise TypeError(f"expected a preset name or ModelConfig, got {type(preset_or_config).__name__}")
    return apply_overrides(config, overrides)
