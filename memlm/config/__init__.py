"""Model configuration: the schema (model, memory sections), dotted overrides, serialisation and
presets. This layer imports nothing else of memlm, and no torch."""

from memlm.config.checks import ConfigError
from memlm.config.io import to_toml, upgrade
from memlm.config.memory import (AdaptiveSpanConfig, CompressiveConfig, FeedbackConfig, KnnConfig, MemoryConfig,
                                 NtmConfig, PersistentConfig, TokensConfig, XLConfig)
from memlm.config.model import (AttentionConfig, FeedForwardConfig, ModelConfig, NormConfig, PositionConfig)
from memlm.config.overrides import apply_overrides
from memlm.config.presets import SIZES, describe, get_preset, presets, resolve

__all__ = [
    "ConfigError", "ModelConfig", "AttentionConfig", "PositionConfig", "NormConfig", "FeedForwardConfig",
    "MemoryConfig", "XLConfig", "FeedbackConfig", "CompressiveConfig", "AdaptiveSpanConfig", "PersistentConfig",
    "TokensConfig", "KnnConfig", "NtmConfig", "apply_overrides", "to_toml", "upgrade", "describe", "get_preset", "presets",
    "resolve", "SIZES",
]
