"""`memlm export RUN --hf OUT`: a run's checkpoint as a Hugging Face model directory.

    OUT/config.json                model_type "memlm", the ModelConfig as the nested dict `memlm`, auto_map
    OUT/model.safetensors          the weights (as MemlmForCausalLM names them: "model." + memlm's names;
                                   a head tied to the embedding is stored once, as model.embed.weight)
    OUT/configuration_memlm.py     remote code (trust_remote_code=True), copied from memlm/hf/;
    OUT/modeling_memlm.py            the model's code imports memlm, which must be installed where it runs
    OUT/tokenization_memlm.py      the byte tokenizer (no memlm needed): bytes 0-255, <|eod|> = 256
    OUT/tokenizer_config.json, special_tokens_map.json
    OUT/tokenizer.json             a run trained with bpe:N or hf:PATH: its tokenizer (PreTrainedTokenizerFast
                                   reads it; tokenizer_config.json then names that class, not the byte one)
    OUT/generation_config.json     eos = pad = bos = the end-of-document id (256 for bytes); samples as
                                   memlm.generate by default
    OUT/README.md                  the model card (memlm.hf.card), from what the run directory records

Nothing here imports transformers: a machine without it can export, and `memlm.from_pretrained`
(memlm.hf.load) reads the directory back into a LanguageModel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import memlm
from memlm.config import ModelConfig
from memlm.data import ByteTokenizer, Tokenizer
from memlm.data.tokenizers import TOKENIZER_FILE
from memlm.fileio import write_dir_atomically
from memlm.hf import card
from memlm.hf.layout import (AUTO_MAP, CARD, CONFIG, EOD, EOD_TEXT, GENERATION_CONFIG, MODEL_TYPE, PREFIX, REMOTE_CODE,
                             SPECIAL_TOKENS, TOKENIZER_AUTO_MAP, TOKENIZER_CONFIG, WEIGHTS, source)
from memlm.hf.load import ExportError
from memlm.model import LanguageModel
from memlm.train import checkpoint
from memlm.train.metrics import read as read_metrics


def export_run(run: str | Path, out: str | Path, pointer: str = "latest") -> Path:
    """Export the checkpoint `pointer` (latest or best) of a run directory, or a checkpoint
    directory itself, to `out`; returns `out`. Raises CheckpointError for a bad run path and
    ExportError for an `out` that holds something else than an earlier export."""
    found = checkpoint.find(run, pointer)
    saved = checkpoint.read_config(found)
    model, _ = checkpoint.load_model(found)
    tokenizer = checkpoint.load_tokenizer(found, saved)
    return save_pretrained(model, out, card.RunRecord.read(run, found, saved, read_metrics), tokenizer)


def save_pretrained(model: LanguageModel, out: str | Path, record: "card.RunRecord | None" = None,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` (any memlm LanguageModel) as a Hugging Face model directory `out`, replacing
    an earlier export there atomically; `record` (what its run recorded) goes into the model card;
    `tokenizer`: the model's (None = bytes)."""
    out = Path(out)
    _check_out(out)
    record = record or card.RunRecord()
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    write_dir_atomically(out, lambda tmp: _fill(tmp, model, record, tokenizer))
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / CONFIG).read_text()).get("model_type") == MODEL_TYPE
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise ExportError(f"{out} is not empty and holds no earlier memlm export: choose another directory")


def _fill(tmp: Path, model: LanguageModel, record: "card.RunRecord", tokenizer: Tokenizer) -> None:
    config: ModelConfig = model.config
    eod = tokenizer.eod
    (tmp / CONFIG).write_text(json.dumps(hf_config(config, eod), indent=2) + "\n")
    safetensors.torch.save_file(weights(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / GENERATION_CONFIG).write_text(json.dumps(generation_config(eod), indent=2) + "\n")
    if tokenizer.kind == "byte":
        special = {"bos_token": EOD_TEXT, "eos_token": EOD_TEXT, "pad_token": EOD_TEXT}
        kind = {"tokenizer_class": "MemlmByteTokenizer", "auto_map": TOKENIZER_AUTO_MAP, "add_bos_token": True}
    else:  # the run's tokenizer.json, read by transformers' PreTrainedTokenizerFast
        special = {"bos_token": tokenizer.eod_name, "eos_token": tokenizer.eod_name, "pad_token": tokenizer.eod_name}
        kind = {"tokenizer_class": "PreTrainedTokenizerFast"}
        (tmp / TOKENIZER_FILE).write_text(tokenizer.json)
    (tmp / TOKENIZER_CONFIG).write_text(json.dumps({
        **kind, **special, "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (tmp / SPECIAL_TOKENS).write_text(json.dumps(special, indent=2) + "\n")
    for name in REMOTE_CODE:
        shutil.copyfile(source(name), tmp / name)
    (tmp / CARD).write_text(card.model_card(model, record, tokenizer))


def hf_config(config: ModelConfig, eod: int = EOD) -> dict[str, Any]:
    """config.json: what MemlmConfig (configuration_memlm.py) reads, the memlm config nested whole."""
    return {
        "model_type": MODEL_TYPE, "architectures": ["MemlmForCausalLM"], "auto_map": AUTO_MAP,
        "memlm": config.to_dict(), "memlm_version": memlm.__version__,
        "vocab_size": config.vocab_size, "hidden_size": config.width, "num_hidden_layers": config.layers,
        "num_attention_heads": config.attention.heads,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod,
        "use_cache": True, "dtype": "float32",
    }


def generation_config(eod: int = EOD) -> dict[str, Any]:
    """generation_config.json: stop at the end-of-document token; by default sample as
    memlm.generate does (temperature 1, no top-k filter: transformers' own default top_k is 50)."""
    return {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod, "do_sample": True, "temperature": 1.0,
            "top_k": 0}


def weights(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The state dict as MemlmForCausalLM names it, copies on the CPU in their dtype; a head tied to the
    embedding is left out (transformers ties it again from `_tied_weights_keys`)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("head.weight")
    return {PREFIX + name: tensor.detach().to("cpu").contiguous().clone()
            for name, tensor in state.items()}
