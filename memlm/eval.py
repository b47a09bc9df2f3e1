"""Evaluation: bits per byte of a model on a whole split.

The split is cut into `batch_size * world_size` contiguous streams (`memlm.data.Streams`,
wrap=False) and walked `seq_len` tokens at a time, so every token of the split is a target
exactly once: the EOD token that ends each document counts as a target like any byte (and
the target of the split's final EOD is its first token, as in training). Then

    loss = mean cross-entropy in nats over those targets (per token)
    bpb  = total nats / bytes those targets stand for / ln 2
    perplexity = exp(loss)               (per token)

The bytes a target stands for come from the split's `byte_lengths` table (bytes per token id,
memlm.data.tokenizers; the EOD counts one byte), so bpb compares models with different
tokenizers on the same text: any window of the split divides its nats by its own bytes. With
the byte tokenizer every id is one byte and bpb = loss / ln 2.

Models without memory score each segment on its own: a target sees only the earlier tokens
of its segment. Models with memory pass `stateful=True`: the state is carried from segment
to segment, and rows whose segment begins a document (or a stream) are reset first (unless
`reset=False`: memory then runs across documents). The result also breaks bpb down by a
target's position within its document (`by_position`: does memory help later in a file?);
a stream that starts inside a document counts positions from the stream's start.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from memlm.data import Streams, TokenSplit


POSITION_EDGES = (0, 128, 512, 2048, 8192, 32768)
"""Lower edges of the position-in-document buckets of `by_position` (the last is open)."""


def positions_in_document(doc_start: torch.Tensor, carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_start (B, T) bool, carry (B,) position of each row's first token when no document
    starts before it -> positions (B, T) within the document, and the next segment's carry (B,)."""
    index = torch.arange(doc_start.shape[1], device=doc_start.device).expand_as(doc_start)  # (B, T)
    last_start = torch.where(doc_start, index, -1).cummax(dim=1).values  # (B, T)
    positions = torch.where(last_start >= 0, index - last_start, carry[:, None] + index)
    return positions, positions[:, -1] + 1


@torch.no_grad()
def evaluate(model: nn.Module, split: TokenSplit, batch_size: int, seq_len: int, max_tokens: int | None = None,
             *, stateful: bool = False, reset: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """{"bpb", "loss", "perplexity", "tokens", "bytes", "by_position"} of `model` on `split` (see the
    module docstring).

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
    edges = torch.tensor(POSITION_EDGES, device=device)
    nll = torch.zeros(len(POSITION_EDGES), dtype=torch.float64, device=device)  # per position bucket
    count = torch.zeros(len(POSITION_EDGES), dtype=torch.float64, device=device)
    size = torch.zeros(len(POSITION_EDGES), dtype=torch.float64, device=device)  # bytes of the targets
    lengths = (torch.from_numpy(split.byte_lengths).to(device, torch.float64) if split.byte_lengths is not None
               else None)  # (V,)
    carry = torch.zeros(batch_size, dtype=torch.long, device=device)
    state = model.init_state(batch_size, device=device) if stateful else None
    try:
        for segment in itertools.islice(streams, segments):
            x, y = segment.x.to(device), segment.y.to(device)  # (B, T)
            valid = segment.valid.to(device)  # (B, T)
            starts = segment.doc_start[:, 0]  # (B,) rows whose segment begins a document
            if state is not None and reset and state.position > 0 and bool(starts.any()):
                state = state.reset(starts.to(device))
            out = model(x, state=state)
            targets = y.masked_fill(~valid, -100)  # (B, T); padding after a stream's end is not scored
            losses = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="none")  # (B * T,)
            positions, carry = positions_in_document(segment.doc_start.to(device), carry)
            bucket = torch.bucketize(positions.flatten(), edges, right=True) - 1  # (B * T,)
            nll.index_add_(0, bucket, losses.double())
            count.index_add_(0, bucket, valid.flatten().double())
            scored = valid.flatten().double()  # (B * T,) bytes of each target: 1 per byte token
            size.index_add_(0, bucket, scored if lengths is None else scored * lengths[y.flatten()])
            state = out.state
    finally:
        model.train(was_training)
    if world_size > 1:
        totals = torch.stack([nll, count, size])
        torch.distributed.all_reduce(totals)
        nll, count, size = totals[0], totals[1], totals[2]
    loss = (nll.sum() / count.sum()).item()
    bpb = (nll.sum() / size.sum()).item() / math.log(2)  # = loss / ln 2 when every token is one byte
    by_position = [{"from": int(lo), "to": int(hi) if hi is not None else None, "tokens": int(c),
                    "bpb": float(n / b / math.log(2)) if c > 0 else None}
                   for lo, hi, n, c, b in zip(POSITION_EDGES, POSITION_EDGES[1:] + (None,), nll.tolist(),
                                              count.tolist(), size.tolist())]
    perplexity = math.exp(loss) if loss < 709.0 else math.inf  # exp overflows a float past ~709.78
    return {"bpb": bpb, "loss": loss, "perplexity": perplexity, "tokens": int(count.sum().item()),
            "bytes": int(size.sum().item()), "by_position": by_position}
