"""The memory section of a model config: one section per mechanism, each with its own checks.

`memory.xl.length`, `memory.knn.k`, ... Each section's `validate(model)` checks its own fields
and its combinations with the rest of the model (it is handed the whole ModelConfig), naming
the field in the ConfigError. The sections live here, in the config layer, not in the
mechanisms' modules: a config must load, validate and serialise without importing the torch
modules that run it, and the config layer sits below every module that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memlm.config.checks import ConfigError, choice, fraction, layer_list, non_negative_int, positive_int

if TYPE_CHECKING:
    from memlm.config.model import ModelConfig

MEMORY_SCHEDULES = ("constant", "linear")
FEEDBACK_MODES = ("none", "memory", "add")
COMPRESS_FNS = ("max", "mean", "conv", "most_used")
KNN_BACKENDS = ("exact", "faiss")
KNN_COMBINE = ("gate", "joint")
KNN_DTYPES = ("float32", "bfloat16")


@dataclass
class XLConfig:
    """Transformer-XL recurrence (memlm.memory.xl)."""

    length: int = 0
    """Transformer-XL memory (arXiv 1901.02860): earlier positions each layer attends to; 0 = off."""
    lengths: list[int] | None = None
    """Memory length per layer, bottom to top; overrides length and schedule (arXiv 2007.03356)."""
    schedule: str = "constant"
    """Lengths by depth when `lengths` is unset: constant, or linear from min_length (bottom) to length (top)."""
    min_length: int = 0
    """Memory length of the bottom layer for the linear schedule."""
    eval_multiplier: float = 1.0
    """Memory lengths are multiplied by this in evaluation mode (a longer memory at test time, as
    Transformer-XL evaluates). Positions that extrapolate (xPos) take it better than RoPE;
    `memlm eval --memory-multiplier` sets it for a trained model."""

    def lengths_by_layer(self, layers: int, training: bool = True) -> list[int]:
        """Memory length of each layer, bottom to top, for training or evaluation mode."""
        if self.lengths is not None:
            lengths = list(self.lengths)
        elif self.schedule == "linear" and layers > 1:
            lengths = [round(self.min_length + (self.length - self.min_length) * i / (layers - 1))
                       for i in range(layers)]
        else:
            lengths = [self.length] * layers
        if not training and self.eval_multiplier != 1.0:
            lengths = [int(round(n * self.eval_multiplier)) for n in lengths]
        return lengths

    def carries_hidden_states(self) -> bool:
        return bool(self.lengths and any(self.lengths)) or self.length > 0

    def validate(self, model: "ModelConfig") -> None:
        choice("memory.xl.schedule", self.schedule, MEMORY_SCHEDULES)
        non_negative_int("memory.xl.length", self.length)
        non_negative_int("memory.xl.min_length", self.min_length)
        if self.lengths is not None:
            if (not isinstance(self.lengths, (list, tuple)) or len(self.lengths) != model.layers
                    or any(not isinstance(n, int) or n < 0 for n in self.lengths)):
                raise ConfigError("memory.xl.lengths", self.lengths,
                                  f"must be a list of {model.layers} integers >= 0, one per layer")
        if self.schedule == "linear" and self.min_length > self.length:
            raise ConfigError("memory.xl.min_length", self.min_length,
                              f"must not exceed memory.xl.length={self.length}")
        if self.eval_multiplier <= 0:
            raise ConfigError("memory.xl.eval_multiplier", self.eval_multiplier, "must be > 0")


@dataclass
class FeedbackConfig:
    """Layerwise feedback (memlm.memory.feedback)."""

    mode: str = "none"
    """none; memory (layer i's memory is the previous segments' output of layer i+1, the top
    layer's its own output); add (add the previous segment's output of layer i+1 to layer i's
    input, position by position)."""

    def carries_hidden_states(self) -> bool:
        return self.mode != "none"

    def validate(self, model: "ModelConfig") -> None:
        choice("memory.feedback.mode", self.mode, FEEDBACK_MODES)
        if self.mode == "memory" and not any(model.memory_lengths()):
            raise ConfigError("memory.feedback.mode", self.mode,
                              "feedback into memory needs memory.xl.length (or lengths) > 0")


@dataclass
class CompressiveConfig:
    """Compressive memory (memlm.memory.compressive)."""

    rate: int = 0
    """Compressive memory (arXiv 1911.05507): memories leaving the recurrent memory are compressed
    by this rate into a compressed memory; 0 = off."""
    length: int = 0
    """Compressed memory slots per layer."""
    fn: str = "conv"
    """Compression function: max, mean, conv (learned 1D convolution), most_used."""
    loss_weight: float = 1.0
    """Weight of the attention-reconstruction loss (trains only the compressor) in aux_loss."""

    def validate(self, model: "ModelConfig") -> None:
        choice("memory.compressive.fn", self.fn, COMPRESS_FNS)
        if not self.rate:
            return
        positive_int("memory.compressive.rate", self.rate)
        positive_int("memory.compressive.length", self.length)
        if not any(model.memory_lengths()):
            raise ConfigError("memory.compressive.rate", self.rate,
                              "compression needs a recurrent memory (memory.xl.length > 0) to compress")
        if model.memory.feedback.mode == "add":
            raise ConfigError("memory.compressive.rate", self.rate,
                              "compressive memory compresses the recurrent memory; feedback mode add has none")


@dataclass
class AdaptiveSpanConfig:
    """Adaptive attention span (memlm.memory.adaptive_span)."""

    enabled: bool = False
    """Adaptive attention span (arXiv 1905.07799): a learned span per head with a soft ramp."""
    max: int | None = None
    """Largest span a head may learn; None = seq_len + the largest memory length."""
    ramp: int = 32
    """Width R of the soft ramp at the end of a span."""
    init: float = 0.0
    """Initial span as a fraction of max."""
    penalty: float = 2e-6
    """Weight of the span penalty (mean learned span in positions, summed over layers) in aux_loss."""
    gradient: str = "dense"
    """How the spans get their gradient in training: dense (through the attention kernel's gradient of the whole (H, Tq, Tk) soft-mask bias) or band (the kernel takes the bias detached, and a second attention over only each head's ramp band gives the spans' exact gradient; without attention dropout; memlm.memory.adaptive_span)."""

    def validate(self, model: "ModelConfig") -> None:
        if not self.enabled:
            return
        if self.gradient not in ("dense", "band"):
            raise ConfigError("memory.adaptive_span.gradient", self.gradient, "allowed: dense, band")
        if self.max is not None:
            positive_int("memory.adaptive_span.max", self.max)
        positive_int("memory.adaptive_span.ramp", self.ramp)
        fraction("memory.adaptive_span.init", self.init, closed=True)
        if self.penalty < 0:
            raise ConfigError("memory.adaptive_span.penalty", self.penalty, "must be >= 0")


@dataclass
class PersistentConfig:
    """Persistent memory vectors (memlm.memory.persistent)."""

    vectors: int = 0
    """Persistent memory (arXiv 1907.01470): learned key/value vectors per layer and key/value head,
    without positions, always visible; 0 = off. Set feedforward.kind=none to let them replace it."""

    def validate(self, model: "ModelConfig") -> None:
        non_negative_int("memory.persistent.vectors", self.vectors)


@dataclass
class TokensConfig:
    """Memory tokens (memlm.memory.tokens)."""

    count: int = 0
    """Memory tokens (Memory Transformer, arXiv 2006.11527): M learned embeddings read before every
    segment, seen by all its tokens; 0 = off. Combine with recurrent and kNN memory, which hold the
    segments' token positions only."""
    recurrent: bool = False
    """Recurrent memory tokens (as in the Recurrent Memory Transformer, arXiv 2207.06881): M write
    tokens after each segment; their outputs are the next segment's memory tokens."""

    def validate(self, model: "ModelConfig") -> None:
        non_negative_int("memory.tokens.count", self.count)
        if not isinstance(self.recurrent, bool):
            raise ConfigError("memory.tokens.recurrent", self.recurrent, "must be true or false")
        if self.recurrent and not self.count:
            raise ConfigError("memory.tokens.recurrent", self.recurrent, "needs memory.tokens.count > 0")
        if self.count and model.position.kind == "tupe":
            raise ConfigError("position.kind", "tupe",
                              "TUPE's untied term needs an absolute position for every query and key, "
                              "and memory tokens have none; with memory.tokens use rope, xpos, t5, "
                              "learned, sinusoidal or none")


@dataclass
class KnnConfig:
    """kNN memory over an external store (memlm.memory.knn)."""

    layers: list[int] | None = None
    """kNN memory (Memorizing Transformers, arXiv 2203.08913): layers (0-based) whose queries also
    attend to their top-k keys/values retrieved from an external store of the stream's past."""
    k: int = 32
    """Retrieved keys/values per query."""
    capacity: int = 65536
    """Entries kept per stream (row) and key/value head; the oldest are evicted first."""
    backend: str = "exact"
    """Store: exact (device tensors, matmul + top-k) or faiss (faiss-cpu index)."""
    dtype: str = "float32"
    """Exact store: precision of the stored keys/values and of the search (float32, or bfloat16:
    half the memory, a faster search; near-equal scores may rank differently). faiss holds float32."""
    combine: str = "gate"
    """How retrieved and local attention combine: gate (learned per-head sigmoid gate, as in the
    paper) or joint (one softmax over local and retrieved keys)."""
    straight_through: bool = False
    """Pass the gradient of the retrieved keys and values straight through to the query."""

    def carries_hidden_states(self) -> bool:
        return bool(self.layers)

    def validate(self, model: "ModelConfig") -> None:
        if self.layers is None:
            return
        layer_list("memory.knn.layers", self.layers, model.layers)
        positive_int("memory.knn.k", self.k)
        positive_int("memory.knn.capacity", self.capacity)
        choice("memory.knn.backend", self.backend, KNN_BACKENDS)
        choice("memory.knn.combine", self.combine, KNN_COMBINE)
        choice("memory.knn.dtype", self.dtype, KNN_DTYPES)
        if self.backend == "faiss" and self.dtype != "float32":
            raise ConfigError("memory.knn.dtype", self.dtype, "the faiss store holds float32")


@dataclass
class NtmConfig:
    """Slot memory with learned erase/add writes (memlm.memory.ntm)."""

    layers: list[int] | None = None
    """Neural Turing Machine memory (arXiv 1410.5401): layers (0-based) whose attention also reads
    a per-stream memory of `slots` vectors by content, written after each segment; None = off."""
    slots: int = 16
    """Memory slots per stream and layer."""

    def carries_hidden_states(self) -> bool:
        return bool(self.layers)

    def validate(self, model: "ModelConfig") -> None:
        if self.layers is None:
            return
        layer_list("memory.ntm.layers", self.layers, model.layers)
        positive_int("memory.ntm.slots", self.slots)


@dataclass
class MemoryConfig:
    xl: XLConfig = field(default_factory=XLConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    compressive: CompressiveConfig = field(default_factory=CompressiveConfig)
    adaptive_span: AdaptiveSpanConfig = field(default_factory=AdaptiveSpanConfig)
    persistent: PersistentConfig = field(default_factory=PersistentConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    ntm: NtmConfig = field(default_factory=NtmConfig)
    reset_at_document: bool = True
    """Forget a stream's memory where a new document starts (at segment boundaries); False = carry it
    across documents."""
    train_reset: float = 0.0
    """Training only: the probability that a batch row also forgets its memory (recurrent, kNN, all
    of its state) at the start of any segment, so the model learns to work from an empty memory,
    which is how evaluation streams and generation begin. 0 = only at documents."""

    def sections(self) -> list:
        return [self.xl, self.feedback, self.compressive, self.adaptive_span, self.persistent, self.tokens,
                self.knn, self.ntm]

    def carries_hidden_states(self) -> bool:
        """Whether some mechanism needs the hidden states of earlier segments kept in the state."""
        return any(getattr(section, "carries_hidden_states", lambda: False)() for section in self.sections())

    def validate(self, model: "ModelConfig") -> None:
        for section in self.sections():
            section.validate(model)
        fraction("memory.train_reset", self.train_reset)
