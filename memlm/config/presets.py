"""Presets: recipe functions that build a ModelConfig for a size, each with a one-line description.

A preset name is `<recipe>-<size>` (`seed-xl-small`). Recipes say what they turn on and cite the
paper; measured results live in BENCHMARKS.md, not here.
"""

from __future__ import annotations

from typing import Any, Callable

from memlm.config.checks import ConfigError
from memlm.config.memory import (AdaptiveSpanConfig, CompressiveConfig, FeedbackConfig, KnnConfig, MemoryConfig,
                                 PersistentConfig, XLConfig)
from memlm.config.model import AttentionConfig, FeedForwardConfig, ModelConfig, NormConfig, PositionConfig
from memlm.config.overrides import apply_overrides

SIZES = {
    "tiny": dict(layers=4, width=128, heads=4, seq_len=256),
    "small": dict(layers=12, width=512, heads=8, seq_len=512),
    "base": dict(layers=12, width=768, heads=12, seq_len=1024),
    "large": dict(layers=33, width=1024, heads=16, seq_len=1024),
    "xl": dict(layers=48, width=1600, heads=25, seq_len=1024),
}
"""Size name -> layers, width, heads, seq_len. large (seed: 351M parameters, vanilla 417M) and xl
(GPT-2 XL's shape; seed: 1.24B, vanilla 1.48B) are for several GPUs with --parallel fsdp
(memlm.train.fsdp). Layer counts keep the ablations' memory arithmetic exact (`memlm ablate`)."""

Recipe = Callable[..., ModelConfig]
RECIPES: dict[str, tuple[Recipe, str]] = {}
"""Recipe name -> (function of layers, width, heads, seq_len; one-line description)."""


def recipe(name: str, description: str) -> Callable[[Recipe], Recipe]:
    def register(fn: Recipe) -> Recipe:
        RECIPES[name] = (fn, description)
        return fn
    return register


@recipe("vanilla", "GPT-2-style baseline: learned positions, LayerNorm, GELU, biases, multi-head")
def vanilla(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """GPT-2 ("Language Models are Unsupervised Multitask Learners") blocks."""
    return ModelConfig(
        width=width, layers=layers, seq_len=seq_len, bias=True,
        attention=AttentionConfig(heads=heads),
        position=PositionConfig(kind="learned"),
        norm=NormConfig(kind="layernorm"),
        feedforward=FeedForwardConfig(kind="gelu"),
    )


@recipe("seed", "bias-free, ScaleNorm, QK-norm, squared ReLU, multi-query, RoPE")
def seed(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """The programme's choices: bias-free, ScaleNorm, QK-norm, squared ReLU, multi-query, RoPE."""
    return ModelConfig(
        width=width, layers=layers, seq_len=seq_len, bias=False,
        attention=AttentionConfig(heads=heads, kv_heads=1, qk_norm=True),
        position=PositionConfig(kind="rope"),
        norm=NormConfig(kind="scalenorm"),
        feedforward=FeedForwardConfig(kind="relu2"),
    )


@recipe("seed-xl", "seed + Transformer-XL recurrent memory of one segment")
def seed_xl(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed plus Transformer-XL recurrence (arXiv 1901.02860) with memory = segment length."""
    config = seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(xl=XLConfig(length=seq_len))
    return config


@recipe("seed-xl-top", "seed-xl with long memory only in the top sixth of the layers, a quarter segment below")
def seed_xl_top(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-xl with a long memory (one segment) only in the top sixth of the layers and a short one
    (a quarter segment) below, after "Do Transformers Need Deep Long-Range Memory?" (Rae & Razavi,
    arXiv 2007.03356), which keeps long-range memories in a few upper layers and gives the others
    a short-range memory."""
    config = seed(layers, width, heads, seq_len)
    top = max(1, layers // 6)
    config.memory = MemoryConfig(xl=XLConfig(lengths=[seq_len // 4] * (layers - top) + [seq_len] * top))
    return config


@recipe("seed-mem", "seed + feedback memory, adaptive span, compressive and persistent memory")
def seed_mem(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed plus the memory combination the programme proposes: recurrence with layerwise
    feedback, per-layer lengths learned by adaptive span, compressive and persistent memory."""
    config = seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(xl=XLConfig(length=seq_len), feedback=FeedbackConfig(mode="memory"),
                                 adaptive_span=AdaptiveSpanConfig(enabled=True, init=0.5),
                                 compressive=CompressiveConfig(rate=4, length=seq_len // 4),
                                 persistent=PersistentConfig(vectors=16))
    return config


@recipe("seed-compressive", "seed-xl + compressive memory (rate 4, seq_len / 4 slots, learned conv)")
def seed_compressive(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-xl plus compressive memory ("Compressive Transformers for Long-Range Sequence
    Modelling", Rae et al., arXiv 1911.05507): memories leaving the segment-long XL memory are
    compressed at rate 4 into seq_len / 4 slots by a learned 1D convolution trained with the
    attention-reconstruction loss, the paper's best compression function."""
    config = seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(xl=XLConfig(length=seq_len),
                                 compressive=CompressiveConfig(rate=4, length=seq_len // 4, fn="conv"))
    return config


@recipe("seed-knn", "seed + one kNN memory layer at 3/4 depth (65,536 bf16 entries per row, exact, top-32, gated)")
def seed_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed plus one kNN memory layer ("Memorizing Transformers", Wu et al., arXiv 2203.08913):
    at about 3/4 depth, never the top layer (index 9 of 12, 2 of 4; the paper puts its one kNN
    layer near the top of the stack), 65,536 entries per row in the exact store (bfloat16 keys
    and values: the search bounds this layer's cost), top-32 retrieval and the paper's learned
    per-head gate between local and retrieved attention."""
    config = seed(layers, width, heads, seq_len)
    config.memory = MemoryConfig(knn=KnnConfig(layers=[max(0, min(layers - 2, 3 * layers // 4))], k=32,
                                               capacity=65536, backend="exact", combine="gate", dtype="bfloat16"))
    return config


@recipe("seed-xl-knn", "seed-knn + Transformer-XL recurrent memory of one segment (as in Memorizing Transformers)")
def seed_xl_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-knn plus Transformer-XL recurrence of one segment in every layer: the setting of
    Memorizing Transformers (arXiv 2203.08913), whose local attention is an XL cache and whose kNN
    layer searches the older past."""
    config = seed_knn(layers, width, heads, seq_len)
    config.memory.xl.length = seq_len
    return config


@recipe("xl2-knn", "GPT-2-style blocks, RoPE on half of each head, XL memory of two segments, "
                   "one kNN layer, dropout 0.2/0.2/0.1, train_reset 0.1")
def xl2_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """seed-xl-knn's memory with a Transformer-XL memory of two segments (Dai et al., arXiv
    1901.02860), on GPT-2-style blocks as x-transformers builds them (LayerNorm, GELU, biases, a
    key/value head per query head, no QK-norm, RoPE on half of each head), with dropout on
    embeddings and residual branches (0.2), the feed-forward hidden units (0.2) and the attention
    probabilities (0.1), and memory.train_reset 0.1. The dropout suits corpora of ~10M tokens
    trained for many epochs; lower it for large ones. Departure from the seed family: its blocks
    are not the programme's."""
    config = vanilla(layers, width, heads, seq_len)
    config.position = PositionConfig(kind="rope", rope_dim=(width // heads) // 2)
    config.attention.kv_heads = heads
    config.dropout, config.feedforward.dropout, config.attention.dropout = 0.2, 0.2, 0.1
    config.memory = seed_knn(layers, width, heads, seq_len).memory
    config.memory.xl.length, config.memory.train_reset = 2 * seq_len, 0.1
    return config


@recipe("xl4-xpos-knn", "xl2-knn with xPos instead of RoPE and XL memory of four segments, twice that in evaluation")
def xl4_xpos_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """xl2-knn with xPos ("A Length-Extrapolatable Transformer", Sun et al., arXiv 2212.10554) in
    place of RoPE on the same half of each head, a Transformer-XL memory of four segments, and
    twice that memory in evaluation (memory.xl.eval_multiplier 2, as Transformer-XL, arXiv
    1901.02860, tests with a longer memory than it trains with). xPos's decay keeps distances
    beyond those trained usable, where RoPE's break. The attention spans five segments."""
    config = xl2_knn(layers, width, heads, seq_len)
    config.position.kind = "xpos"
    config.memory.xl.length, config.memory.xl.eval_multiplier = 4 * seq_len, 2.0
    return config


@recipe("depth-xpos-knn", "xl4-xpos-knn with memory that grows with depth (one segment in the lower half "
                          "of the layers, four above)")
def depth_xpos_knn(layers: int, width: int, heads: int, seq_len: int) -> ModelConfig:
    """xl4-xpos-knn with memory lengths that grow with depth: one segment of XL memory in the lower
    half of the layers, four in the upper half (twice each in evaluation). "Do Transformers Need Deep
    Long-Range Memory?" (Rae and Razavi, arXiv 2007.03356) finds long-range memory needed in only a
    few layers, best the upper ones; the paper keeps it in fewer layers than half and gives the
    others a short memory, as here. The lower layers' attention spans two segments instead of five."""
    config = xl4_xpos_knn(layers, width, heads, seq_len)
    shallow = layers // 2
    config.memory.xl.lengths = [seq_len] * shallow + [4 * seq_len] * (layers - shallow)
    return config


PRESET_ORDER = ("vanilla", "seed", "seed-xl", "seed-xl-top", "seed-mem", "seed-compressive", "seed-knn",
                "seed-xl-knn", "xl2-knn", "xl4-xpos-knn", "depth-xpos-knn")
"""The order `presets()` lists recipes in, within each size."""


def presets() -> list[str]:
    """The preset names, in a stable order."""
    return [f"{name}-{size}" for size in SIZES for name in PRESET_ORDER]


def split_name(name: str) -> tuple[str, str]:
    recipe_name, _, size = name.rpartition("-")
    if recipe_name not in RECIPES or size not in SIZES:
        raise ConfigError("preset", name, f"allowed: {', '.join(presets())}")
    return recipe_name, size


def describe(name: str) -> str:
    """One line on what a preset turns on."""
    return RECIPES[split_name(name)[0]][1]


def get_preset(name: str) -> ModelConfig:
    recipe_name, size = split_name(name)
    return RECIPES[recipe_name][0](**SIZES[size])


def resolve(preset_or_config: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A validated config from a preset name or a config, with dotted overrides applied."""
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, ModelConfig):
        config = preset_or_config
    else:
        raise TypeError(f"expected a preset name or ModelConfig, got {type(preset_or_config).__name__}")
    return apply_overrides(config, overrides)
