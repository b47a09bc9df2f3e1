"""Text samples from a model: a prompt after an end-of-document token, decoded back to text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from memlm.data import ByteTokenizer, Tokenizer
from memlm.decode.streaming import TextStream, stream


def sample_text(model: nn.Module, prompt: str = "", max_new_tokens: int = 256, temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0, *,
                stop_at_eod: bool = False, stop_strings: Sequence[str] = (),
                on_text: Callable[[str], None] | None = None,
                tokenizer: Tokenizer | None = None) -> tuple[str, list[int]]:
    """(decoded continuation, its ids) of `prompt`, which is fed after an EOD so that the model
    sees the start of a document. The same seed gives the same sample.

    stop_at_eod: end at the model's end-of-document token (not included); stop_strings: end
    before the first of them (the ids returned are those decoded, up to the one that completed
    it). on_text: called with each piece of text as soon as it is final (streaming).
    tokenizer: the model's (memlm.train.load_tokenizer); None = bytes."""
    device = next(model.parameters()).device
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    prompt_ids = torch.from_numpy(tokenizer.encode(prompt)).to(device)  # (P,)
    ids = torch.cat([torch.tensor([tokenizer.eod], device=device), prompt_ids])  # (P + 1,)
    generator = torch.Generator(device=device).manual_seed(seed)
    text = TextStream(stop_strings, tokenizer.eod_text, tokenizer)
    pieces, new_ids = [], []
    for token in stream(model, ids, max_new_tokens, temperature, top_k, top_p, generator=generator,
                        stop_ids=[tokenizer.eod] if stop_at_eod else ()):
        new_ids.append(token)
        piece = text.feed([token])
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        if text.stopped:
            break
    piece = text.finish()
    if piece:
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return "".join(pieces), new_ids
