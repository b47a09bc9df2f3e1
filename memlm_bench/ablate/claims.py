"""The reading list's claims, each as arms of memlm configs that `memlm ablate` trains side by side.

A claim names its paper, its arms (a preset recipe plus dotted model overrides, and training
overrides where the claim needs them), how the arms are compared (`Comparison`: a metric, the
treatment and baseline arms and the direction the paper claims) and the budget the comparison is
fair at (equal wall-clock or equal tokens). Where memlm lacks what the paper did, the claim is
registered with the closest existing switches and `needs` says what is missing, so that a verdict
is never read as more than it tests.

    claim = CLAIMS["2"]
    configs = {arm.name: arm_config(arm, "tiny") for arm in claim.arms}   # validated ModelConfigs

Metrics (memlm_bench.ablate.measures computes the derived ones):
    test_bpb              test bits per byte (whole test split, memory kept) after the budget
    params                parameters of the model
    decode_tokens_per_s   greedy decoding tokens/s at batch 1 (memlm.generate)
    tokens_to_target      training tokens until validation bpb first reaches the worst arm's best
                          validation bpb of the same seed (linear between evaluations)
    divergence_rate       share of the claim's learning-rate sweep whose runs diverged
    test_bpb@Nx           test bpb scored in windows of N x the training seq_len, no memory
    ood_bpb:SPEC          test bpb on the test split of another corpus (a --data spec)
    span_depth_slope      learned adaptive span (mean over heads) of the upper half of the layers
                          minus the lower half's, in positions (one arm, tested against zero)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from memlm.config import SIZES, ModelConfig, resolve

Overrides = dict[str, Any] | Callable[[ModelConfig], dict[str, Any]]
"""Dotted model overrides, or a function of the arm's base config (its preset at the run's shape,
global overrides applied) that returns them, for overrides that depend on the shape."""

WALL_CLOCK, TOKENS = "wall-clock", "tokens"
LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    """Preset recipe (`seed`, `vanilla`, `seed-xl`, ...); the size comes from --shape."""
    overrides: Overrides = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields this arm sets (precision, warmup_steps, ...), over the run's own."""

    def preset(self, shape: str) -> str:
        return f"{self.recipe}-{shape}"


@dataclass(frozen=True)
class Comparison:
    metric: str
    treatment: str
    baseline: str | None
    """Arm compared against; None = the treatment's value is tested against zero."""
    direction: str
    """What the paper claims of treatment - baseline: lower or higher."""


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    """The claim as the paper states it (paraphrased to one sentence)."""
    paper: str
    arxiv: str
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]
    budget: str
    """wall-clock or tokens: what the arms are held equal in."""
    setup: str
    """How the arms differ, in words."""
    needs: str | None = None
    """What memlm lacks to test the claim as the paper did (None: nothing)."""
    data: str | None = None
    """The corpus this claim trains on instead of the run's default (an explicit --data wins)."""
    eval_lengths: tuple[int, ...] = ()
    """Also score the test split in windows of these multiples of seq_len (no memory)."""
    eval_data: tuple[str, ...] = ()
    """Also score the test split of these corpora (--data specs)."""
    decode: bool = False
    """Also time greedy decoding at batch 1."""
    spans: bool = False
    """Record the learned adaptive spans."""
    sweep: tuple[tuple[str, Any], ...] = ()
    """A sweep of one training field, (name, value) pairs: every arm runs at each point."""

    def arm(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(c.metric for c in self.comparisons))


def arm_config(arm: Arm, shape: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The arm's validated model config at `shape`: its preset, the run's overrides, then its own."""
    base = resolve(arm.preset(shape), **(overrides or {}))
    own = arm.overrides(base) if callable(arm.overrides) else arm.overrides
    return resolve(base, **own)


def arm_overrides(arm: Arm, shape: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arm's own overrides as applied at `shape` (callables evaluated): for the records."""
    if not callable(arm.overrides):
        return dict(arm.overrides)
    return arm.overrides(resolve(arm.preset(shape), **(overrides or {})))


# ----- shape-dependent overrides ----------------------------------------------------------

def long_on_top(fraction: float) -> Callable[[ModelConfig], dict[str, Any]]:
    """XL lengths with a quarter segment in the lower layers and, in the top `fraction` of the
    layers (at least one), what keeps the total memory at layers x seq_len (the uniform arm's)."""
    def lengths(base: ModelConfig) -> dict[str, Any]:
        layers, total, short = base.layers, base.layers * base.seq_len, base.seq_len // 4
        top = max(1, round(layers * fraction))
        long = (total - short * (layers - top)) // top
        return {"memory.xl.lengths": [short] * (layers - top) + [long] * top}
    return lengths


def long_at_bottom(fraction: float) -> Callable[[ModelConfig], dict[str, Any]]:
    """long_on_top upside down: the long memories in the lowest layers (the paper's control)."""
    def lengths(base: ModelConfig) -> dict[str, Any]:
        return {"memory.xl.lengths": long_on_top(fraction)(base)["memory.xl.lengths"][::-1]}
    return lengths


def compressive_half(base: ModelConfig) -> dict[str, Any]:
    """Half the memory uncompressed, half compressed at rate 4: as many slots as the XL arm's seq_len."""
    half = base.seq_len // 2
    return {"memory.xl.length": half, "memory.compressive.rate": 4, "memory.compressive.length": half,
            "memory.compressive.fn": "conv"}


def persistent_for_ffn(base: ModelConfig) -> dict[str, Any]:
    """No feed-forward; persistent key/value vectors with as many parameters as the feed-forward
    had (2 x mult x width^2 per layer without biases; a vector holds a key and a value of
    head_dim per key/value head)."""
    ffn = 2 * int(base.feedforward.mult * base.width) * base.width
    return {"feedforward.kind": "none",
            "memory.persistent.vectors": max(1, round(ffn / (2 * base.head_dim * base.kv_heads)))}


def xl_segment(base: ModelConfig) -> dict[str, Any]:
    return {"memory.xl.length": base.seq_len}


# ----- the registry -----------------------------------------------------------------------

def _claims() -> list[Claim]:
    bpb = lambda treatment, baseline: Comparison("test_bpb", treatment, baseline, LOWER)  # noqa: E731
    return [
        Claim("1", "A learned relative position bias (T5's bucketed scalar per head) models language better "
                   "than learned absolute position embeddings.",
              "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", "1910.10683",
              (Arm("learned", "vanilla"), Arm("t5", "vanilla", {"position.kind": "t5"})),
              (bpb("t5", "learned"),), WALL_CLOCK,
              "vanilla (GPT-2 blocks): learned absolute positions vs the T5 relative bias (32 buckets, shared)"),
        Claim("2", "Multi-query attention (one key/value head) shrinks the model and the decoding cache and "
                   "decodes much faster, at only a minor loss of quality.",
              "Fast Transformer Decoding: One Write-Head is All You Need", "1911.02150",
              (Arm("multi-head", "seed", {"attention.kv_heads": None}), Arm("multi-query", "seed")),
              (Comparison("params", "multi-query", "multi-head", LOWER),
               Comparison("decode_tokens_per_s", "multi-query", "multi-head", HIGHER),
               bpb("multi-query", "multi-head")), WALL_CLOCK,
              "seed with a key/value head per query head vs one (the preset's); decode: greedy, batch 1",
              needs="the paper claims a minor quality loss, not a gain: the bpb comparison's 'lower' is the "
                    "test of parity's better side; a 'refuted' there is the size of the loss",
              decode=True),
        Claim("3", "Long-range memory is needed only in a few upper layers: short memories below and long ones "
                   "on top match or beat the same memory in every layer, down to long memory in 1/6 of them.",
              "Do Transformers Need Deep Long-Range Memory?", "2007.03356",
              (Arm("uniform", "seed-xl"), Arm("long-top-half", "seed-xl", long_on_top(1 / 2)),
               Arm("long-top-sixth", "seed-xl", long_on_top(1 / 6)),
               Arm("long-bottom-sixth", "seed-xl", long_at_bottom(1 / 6))),
              (bpb("long-top-half", "uniform"), bpb("long-top-sixth", "uniform"),
               bpb("long-top-sixth", "long-bottom-sixth")), WALL_CLOCK,
              "seed-xl, total XL memory held at layers x seq_len: uniform (seq_len each) vs seq_len/4 below and "
              "the rest in the top half / top sixth (at least one layer), and the sixth at the bottom as control",
              needs="the paper holds the number of long-range memories, not the total, against the uniform "
                    "model; here the total is held equal so the arms cost the same attention"),
        Claim("4", "Adaptive attention span learns short spans in lower layers and long ones in upper layers, "
                   "matching a fixed span at a lower cost.",
              "Adaptive Attention Span in Transformers", "1905.07799",
              (Arm("fixed", "seed-xl"),
               Arm("adaptive", "seed-xl", {"memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.5})),
              (Comparison("span_depth_slope", "adaptive", None, HIGHER), bpb("adaptive", "fixed")), WALL_CLOCK,
              "seed-xl (memory one segment) with a fixed span vs adaptive spans (initial span half the maximum)",
              spans=True),
        Claim("5", "Compressing old memories beats a Transformer-XL memory of the same size.",
              "Compressive Transformers for Long-Range Sequence Modelling", "1911.05507",
              (Arm("xl", "seed-xl"), Arm("compressive", "seed-xl", compressive_half)),
              (bpb("compressive", "xl"),), WALL_CLOCK,
              "seed-xl with XL memory seq_len vs XL memory seq_len/2 plus seq_len/2 compressed slots "
              "(rate 4, learned convolution): the same number of memory slots"),
        Claim("6", "Persistent memory vectors can replace the feed-forward layer at the same number of "
                   "parameters without loss.",
              "Augmenting Self-attention with Persistent Memory", "1907.01470",
              (Arm("feed-forward", "seed"), Arm("persistent", "seed", persistent_for_ffn)),
              (bpb("persistent", "feed-forward"),), WALL_CLOCK,
              "seed vs seed without feed-forward and with as many persistent key/value parameters",
              needs="memlm keeps one set of persistent vectors per key/value head (one set under the seed "
                    "preset's multi-query attention), where the paper has one per head"),
        Claim("7", "A kNN memory over the stream's past lowers perplexity on long documents, without memory "
                   "and on top of a Transformer-XL cache.",
              "Memorizing Transformers", "2203.08913",
              (Arm("none", "seed"), Arm("knn", "seed-knn"), Arm("xl", "seed-xl"), Arm("xl-knn", "seed-xl-knn")),
              (bpb("knn", "none"), bpb("xl-knn", "xl")), WALL_CLOCK,
              "seed, seed-knn (one kNN layer at 3/4 depth), seed-xl, seed-xl-knn, on long documents",
              data="stdlib-long"),
        Claim("8", "Feeding higher layers' representations back into the memory beats Transformer-XL's "
                   "same-layer memory.",
              "Addressing Some Limitations of Transformers with Feedback Memory", "2002.09402",
              (Arm("xl", "seed-xl"), Arm("feedback", "seed-xl", {"memory.feedback.mode": "memory"})),
              (bpb("feedback", "xl"),), WALL_CLOCK,
              "seed-xl vs seed-xl whose layer i remembers layer i+1's outputs",
              needs="the paper's feedback memory is one weighted sum of every layer's output shared by all "
                    "layers (and computed step by step); memlm's feedback.mode=memory feeds layer i+1 into "
                    "layer i's memory, segment-wise"),
        Claim("9", "Memory tokens (learned embeddings every segment reads) improve language modelling.",
              "Memory Transformer", "2006.11527",
              (Arm("none", "seed"), Arm("tokens", "seed", {"memory.tokens.count": 16})),
              (bpb("tokens", "none"),), WALL_CLOCK, "seed vs seed with 16 memory tokens"),
        Claim("10", "Biases can be removed from every linear layer and norm with no loss, saving parameters "
                    "and time.",
              "Cramming: Training a Language Model on a Single GPU in One Day", "2212.14034",
              (Arm("bias", "seed", {"bias": True}), Arm("no-bias", "seed")),
              (bpb("no-bias", "bias"), Comparison("params", "no-bias", "bias", LOWER)), WALL_CLOCK,
              "seed with biases everywhere vs bias-free (the preset's)"),
        Claim("11", "ScaleNorm converges faster than LayerNorm.",
              "Transformers without Tears: Improving the Normalization of Self-Attention", "1910.05895",
              (Arm("layernorm", "seed", {"norm.kind": "layernorm"}), Arm("scalenorm", "seed")),
              (Comparison("tokens_to_target", "scalenorm", "layernorm", LOWER), bpb("scalenorm", "layernorm")),
              TOKENS, "seed with LayerNorm vs ScaleNorm (the preset's); target: per seed, the worse arm's best "
                      "validation bpb"),
        Claim("12", "Forgetful causal masking (masking a random share of past tokens in training) makes the "
                    "model generalise better.",
              "FCM: Forgetful Causal Masking Makes Causal Language Models Better Zero-Shot Learners", "2210.13432",
              (Arm("causal", "seed"), Arm("forgetful", "seed", {"attention.forgetful": 0.15})),
              (bpb("forgetful", "causal"), Comparison("ood_bpb:site-packages-text", "forgetful", "causal", LOWER)),
              WALL_CLOCK, "seed vs seed with forgetful causal masking (mask ratio up to 0.15); test split = "
                          "held-out files of the training corpus, plus the out-of-domain `site-packages-text`",
              needs="held-out packages: the test split holds held-out files (split by a hash of the path), "
                    "not whole packages; the paper's claim is zero-shot accuracy, tested here as bpb",
              eval_data=("site-packages-text",)),
        Claim("13", "QK-norm prevents the attention logits from overflowing: training in bf16 without warm-up "
                    "diverges less often over a sweep of learning rates.",
              "Query-Key Normalization for Transformers", "2010.04245",
              (Arm("plain", "seed", {"attention.qk_norm": False}, {"precision": "bf16", "warmup_steps": 0}),
               Arm("qk-norm", "seed", {}, {"precision": "bf16", "warmup_steps": 0})),
              (Comparison("divergence_rate", "qk-norm", "plain", LOWER),), TOKENS,
              "seed without vs with QK-norm, bf16 autocast, no warm-up, each at lr 1e-3, 3e-3, 1e-2, 3e-2, 1e-1; "
              "diverged = a non-finite step, or a last validation bpb above the first",
              sweep=(("lr", 1e-3), ("lr", 3e-3), ("lr", 1e-2), ("lr", 3e-2), ("lr", 1e-1))),
        Claim("14", "Squared ReLU beats GELU; GLU variants beat both but are larger, and still win at matched "
                    "parameters.",
              "Primer: Searching for Efficient Transformers for Language Modeling; GLU Variants Improve "
              "Transformer", "2109.08668, 2002.05202",
              (Arm("gelu", "seed", {"feedforward.kind": "gelu"}), Arm("relu2", "seed"),
               Arm("swiglu", "seed", {"feedforward.kind": "swiglu"}),
               Arm("geglu", "seed", {"feedforward.kind": "geglu"}),
               Arm("swiglu-wide", "seed", {"feedforward.kind": "swiglu", "feedforward.mult": 6.0})),
              (bpb("relu2", "gelu"), bpb("swiglu", "relu2"), bpb("geglu", "relu2"), bpb("swiglu-wide", "relu2"),
               Comparison("params", "swiglu-wide", "relu2", HIGHER)), WALL_CLOCK,
              "seed's feed-forward as GELU, squared ReLU (the preset's), SwiGLU and GeGLU at matched parameters "
              "(hidden 2/3 x 4 x width), and SwiGLU with hidden 4 x width (1.5x the parameters)"),
        Claim("15", "Rotary position embedding in every layer beats learned absolute positions.",
              "RoFormer: Enhanced Transformer with Rotary Position Embedding", "2104.09864",
              (Arm("learned", "vanilla"), Arm("rope", "vanilla", {"position.kind": "rope"})),
              (bpb("rope", "learned"),), WALL_CLOCK, "vanilla (GPT-2 blocks): learned absolute positions vs RoPE"),
        Claim("16", "xPos extrapolates: trained at length L, it keeps its perplexity at 2L, 4L and 8L where "
                    "RoPE's degrades.",
              "A Length-Extrapolatable Transformer", "2212.10554",
              (Arm("rope", "seed"), Arm("xpos", "seed", {"position.kind": "xpos"})),
              tuple(Comparison(f"test_bpb@{n}x", "xpos", "rope", LOWER) for n in (2, 4, 8)), WALL_CLOCK,
              "seed (no memory) with RoPE vs xPos, trained at seq_len L, test split scored in windows of "
              "2L, 4L, 8L",
              needs="the paper extrapolates with blockwise causal attention (each block attends to the one "
                    "before it); memlm scores the longer windows with full causal attention",
              eval_lengths=(2, 4, 8)),
        Claim("17", "TUPE (untied positional attention, no positions added to the tokens) beats adding "
                    "absolute position embeddings.",
              "Rethinking Positional Encoding in Language Pre-training", "2006.15595",
              (Arm("learned", "vanilla"), Arm("tupe", "vanilla", {"position.kind": "tupe"})),
              (bpb("tupe", "learned"),), WALL_CLOCK, "vanilla (GPT-2 blocks): learned absolute positions vs TUPE"),
    ]


CLAIMS: dict[str, Claim] = {claim.id: claim for claim in _claims()}
"""Claim id ('1' ... '17') -> Claim, in the reading list's order."""

SHAPES = tuple(SIZES)
"""--shape choices: the preset sizes."""
