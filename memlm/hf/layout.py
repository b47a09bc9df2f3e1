"""What an exported directory holds: file names and the config.json fields memlm writes and reads.

Shared by the writer (memlm.hf.export) and the reader (memlm.hf.load), neither of which needs
transformers; the remote code (configuration_memlm.py, modeling_memlm.py, tokenization_memlm.py)
is copied from this package into the directory as it is."""

from __future__ import annotations

from pathlib import Path

from memlm.data.tokenizer import EOD, EOD_TEXT

CONFIG, WEIGHTS, GENERATION_CONFIG, CARD = "config.json", "model.safetensors", "generation_config.json", "README.md"
TOKENIZER_CONFIG, SPECIAL_TOKENS = "tokenizer_config.json", "special_tokens_map.json"
REMOTE_CODE = ("configuration_memlm.py", "modeling_memlm.py", "tokenization_memlm.py")
"""Modules of this package copied into an export for `trust_remote_code=True`."""
MODEL_TYPE = "memlm"
PREFIX = "model."
"""Weight names in model.safetensors: the LanguageModel's state-dict keys under MemlmForCausalLM.model."""
AUTO_MAP = {"AutoConfig": "configuration_memlm.MemlmConfig",
            "AutoModelForCausalLM": "modeling_memlm.MemlmForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_memlm.MemlmByteTokenizer", None]}
__all__ = ["CONFIG", "WEIGHTS", "GENERATION_CONFIG", "CARD", "TOKENIZER_CONFIG", "SPECIAL_TOKENS", "REMOTE_CODE",
           "MODEL_TYPE", "PREFIX", "AUTO_MAP", "TOKENIZER_AUTO_MAP", "EOD", "EOD_TEXT", "source"]


def source(name: str) -> Path:
    """The package file of remote-code module `name` (one of REMOTE_CODE)."""
    return Path(__file__).with_name(name)
