"""A run's corpus and tokenizer: the prepared corpus (rank 0 builds it), the model vocabulary the
tokenizer sets, the files a checkpoint keeps of it, and the bytes per token of training bpb."""

from __future__ import annotations

import dataclasses

from memlm.config import ModelConfig
from memlm.data import PreparedCorpus, Tokenizer, prepare
from memlm.data.tokenizers import TOKENIZER_FILE, check_vocab
from memlm.train import distributed
from memlm.train.config import TrainConfig


def prepare_corpus(config: TrainConfig, info: distributed.Dist, tokenizer: Tokenizer | None = None) -> PreparedCorpus:
    """The prepared corpus: rank 0 builds the cache (if needed), the other ranks then read it.
    tokenizer: the one to use (a resumed run's, which is not trained again); None = config.tokenizer."""
    c = config
    tokenizer = tokenizer if tokenizer is not None else c.tokenizer
    if info.main:
        corpus = prepare(c.data, c.cache_dir, c.fractions, verify=c.verify_data, tokenizer=tokenizer)
    distributed.barrier(info)
    if not info.main:
        corpus = prepare(c.data, c.cache_dir, c.fractions, progress=False, tokenizer=tokenizer)
    return corpus


def follow_tokenizer(model_config: ModelConfig, tokenizer: Tokenizer, fixed: str | None) -> ModelConfig:
    """The model config with the tokenizer's vocabulary size. fixed: where the model comes from when
    it is not built here (a given model, a resumed checkpoint): it must have that size already."""
    if fixed is not None:
        check_vocab(tokenizer, model_config.vocab_size, fixed)
        return model_config
    if model_config.vocab_size == tokenizer.vocab_size:
        return model_config
    return dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size).validate()


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """Files a run directory and its checkpoints keep of the tokenizer: a non-byte one's tokenizer.json."""
    return {} if tokenizer.kind == "byte" else {TOKENIZER_FILE: tokenizer.json.encode()}


def bytes_per_token(corpus: PreparedCorpus) -> float:
    """Mean bytes per token of the train split (1 for bytes): training bpb is the loss per token
    over ln 2 and over this (evaluation counts each target's own bytes, memlm.eval)."""
    info = corpus.manifest["splits"]["train"]
    return info.get("scored_bytes", info["tokens"]) / max(1, info["tokens"])


__all__ = ["bytes_per_token", "follow_tokenizer", "prepare_corpus", "tokenizer_files"]
