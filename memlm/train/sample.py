"""Text samples from a model: a prompt after an end-of-document token, decoded bytes back."""

from __future__ import annotations

import torch
from torch import nn

from memlm.data import EOD, ByteTokenizer
from memlm.decode import generate


def sample_text(model: nn.Module, prompt: str = "", max_new_tokens: int = 256, temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> tuple[str, list[int]]:
    """(decoded continuation, its ids) of `prompt`, which is fed after an EOD so that the model
    sees the start of a document. The same seed gives the same sample."""
    device = next(model.parameters()).device
    tokenizer = ByteTokenizer()
    prompt_ids = torch.from_numpy(tokenizer.encode(prompt)).to(device)  # (P,)
    ids = torch.cat([torch.tensor([EOD], device=device), prompt_ids])  # (P + 1,)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, generator=generator)  # (P + 1 + N,)
    new_ids = out[len(ids):].tolist()
    return tokenizer.decode(new_ids), new_ids
