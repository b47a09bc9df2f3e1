"""Hugging Face config of an exported memlm model (remote code for `trust_remote_code=True`).

`memlm export RUN --hf OUT` copies this file into OUT beside modeling_memlm.py; AutoConfig loads
it through config.json's auto_map. The memlm ModelConfig travels whole, as the nested dict
`memlm` (ModelConfig.to_dict()); the usual Hugging Face names (hidden_size, num_hidden_layers,
...) are read from it for tools that look for them. Needs transformers v5 and, to build the
model (modeling_memlm.py), the memlm package installed where it runs.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class MemlmConfig(PreTrainedConfig):
    """config.json of an exported memlm model: `memlm` holds the ModelConfig as a dict."""

    model_type = "memlm"

    memlm: dict[str, Any] | None = None
    """memlm's ModelConfig.to_dict(): every switch of the model (memlm.config.ModelConfig)."""
    vocab_size: int = 257
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 256
    eos_token_id: int | None = 256
    pad_token_id: int | None = 256
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.memlm is not None:  # the Hugging Face names follow the memlm config
            m = self.memlm
            self.vocab_size = m.get("vocab_size", self.vocab_size)
            self.hidden_size = m.get("width", self.hidden_size)
            self.num_hidden_layers = m.get("layers", self.num_hidden_layers)
            self.num_attention_heads = (m.get("attention") or {}).get("heads", self.num_attention_heads)
            self.tie_word_embeddings = m.get("tie_embeddings", self.tie_word_embeddings)
        super().__post_init__(**kwargs)

    def memlm_config(self):
        """The memlm ModelConfig (memlm.config.ModelConfig.from_dict of `memlm`)."""
        from memlm.config import ModelConfig
        if self.memlm is None:
            raise ValueError("this MemlmConfig holds no memlm model config (its `memlm` field is None)")
        return ModelConfig.from_dict(self.memlm)


__all__ = ["MemlmConfig"]
