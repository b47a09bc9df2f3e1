"""memlm: transformer language models with long-range memory.

    import memlm
    model = memlm.build("seed-tiny", **{"attention.kv_heads": 1})
    out = model(input_ids, targets=None, state=None)
    ids = memlm.generate(model, prompt_ids, max_new_tokens=64)
"""

from __future__ import annotations

from typing import Any

from memlm.config import ConfigError, ModelConfig, presets, resolve
from memlm.generate import generate
from memlm.memory.state import State
from memlm.model import LanguageModel, ModelOutput

__version__ = "0.1.0"


def build(preset_or_config: str | ModelConfig = "seed-tiny", **overrides: Any) -> LanguageModel:
    """A model from a preset name or a ModelConfig, with dotted overrides
    (`build("seed-tiny", layers=2, **{"attention.kv_heads": 1})`; `attention__kv_heads=1` works too)."""
    return LanguageModel(resolve(preset_or_config, **overrides))


__all__ = ["build", "generate", "presets", "ModelConfig", "ConfigError", "LanguageModel",
           "ModelOutput", "State", "__version__"]
