"""Evaluation: bits per byte of a model on a whole split.

The split is cut into `batch_size * world_size` contiguous streams (`memlm.data.Streams`,
wrap=False) and walked `seq_len` tokens at a time, so every token of the split is a target
exactly once: the EOD token that ends each document counts as a target like any byte (and
the target of the split's final EOD is its first token, as in training). Then

    loss = mean cross-entropy in nats over those targets
    bpb  = loss / ln 2                   (one token is one byte, or the EOD)
    perplexity = exp(loss)               (per byte)

Models without memory score each segment on its own: a target sees only the earlier tokens
of its segment. Models with memory pass `stateful=True`: the state is carried from segment
to segment, and rows whose segment begins a document (or a stream) are reset first.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from memlm.data import Streams, TokenSplit


@torch.no_grad()
def evaluate(model: nn.Module, split: TokenSplit, batch_size: int, seq_len: int, max_tokens: int | None = None,
             *, stateful: bool = False, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """{"bpb", "loss", "perplexity", "tokens"} of `model` on `split` (see the module docstring).

    max_tokens: score only the first max_tokens // (batch_size * world_size * seq_len) segments
        of the streams (at least one): a sample of the split spread evenly over it, since the
        streams still start at evenly spaced offsets. None = every token.
    stateful: carry `out.state` across segments (the hook for models with memory).
    rank, world_size: under data parallelism each rank scores its own streams and the sums
        are all-reduced, so every rank returns the same numbers.
    Runs in the caller's precision (wrap it in autocast to evaluate in bf16).
    """
    streams = Streams(split, batch_size, seq_len, rank=rank, world_size=world_size, wrap=False)
    segments = max(1, max_tokens // (batch_size * world_size * seq_len)) if max_tokens is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = model.init_state(batch_size, device=device) if stateful else None
    try:
        for segment in itertools.islice(streams, segments):
            x, y = segment.x.to(device), segment.y.to(device)  # (B, T)
            valid = segment.valid.to(device)  # (B, T)
            starts = segment.doc_start[:, 0]  # (B,) rows whose segment begins a document
            if state is not None and state.position > 0 and bool(starts.any()):
                state = state.reset(starts.to(device))
            out = model(x, state=state)
            targets = y.masked_fill(~valid, -100)  # (B, T); padding after a stream's end is not scored
            nll += F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
            count += valid.sum()
            state = out.state
    finally:
        model.train(was_training)
    if world_size > 1:
        totals = torch.stack([nll, count])
        torch.distributed.all_reduce(totals)
        nll, count = totals[0], totals[1]
    loss = (nll / count).item()
    return {"bpb": loss / math.log(2), "loss": loss, "perplexity": math.exp(loss), "tokens": int(count.item())}
