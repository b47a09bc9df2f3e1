"""memlm: transformer language models with long-range memory.

    import memlm
    model = memlm.build("seed-tiny", **{"attention.kv_heads": 1})
    out = model(input_ids, targets=None, state=None)
    ids = memlm.generate(model, prompt_ids, max_new_tokens=64)
    model = memlm.from_pretrained("exported/")   # a directory written by `memlm export RUN --hf exported/`
"""

from __future__ import annotations

from typing import Any

import importlib

from memlm.config import ConfigError, ModelConfig, presets, resolve

__version__ = "0.1.0"

_LAZY = {"generate": "memlm.decode", "stream": "memlm.decode", "State": "memlm.state", "LanguageModel": "memlm.model",
         "ModelOutput": "memlm.model", "from_pretrained": "memlm.hf"}
"""Public names imported on first use, so that `import memlm.config` (configs, presets) needs no torch."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memlm' has no attribute {name!r}")


def build(preset_or_config: str | ModelConfig = "seed-tiny", **overrides: Any):
    """A LanguageModel from a preset name or a ModelConfig, with dotted overrides
    (`build("seed-tiny", layers=2, **{"attention.kv_heads": 1})`; `attention__kv_heads=1` works too)."""
    from memlm.model import LanguageModel
    return LanguageModel(resolve(preset_or_config, **overrides))


__all__ = ["build", "generate", "stream", "presets", "ModelConfig", "ConfigError", "LanguageModel",
           "ModelOutput", "State", "from_pretrained", "__version__"]
