"""Batch loaders over a `TokenSplit`: random windows, or contiguous streams for models with memory.

Both return int64 tensors on the CPU, accept `rank` / `world_size` so that data-parallel
ranks see different data, and resume exactly from `state_dict()`.

Streams cut the split into ``batch_size * world_size`` contiguous parts (lengths differ by
at most one token; every token is in exactly one part); rank r owns parts
``[r * batch_size, (r + 1) * batch_size)``, one per batch row::

    split:  |doc0 E doc1 E doc2 E ... |        (E = EOD, the split's `eod` id)
    parts:  | row 0  | row 1  | ...  | row P-1 |
    step s: x[b] = part b[s*T : (s+1)*T],  y[b] = the token after each x (the true next token of the split)

The target of the split's last token (always EOD) is its first token: after the last
document comes the first one. `doc_start` marks the positions where a model with memory
must forget: the token after an EOD and the first position of a part (its first segment,
and every wrap-around back to its start).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .cache import TokenSplit
from .errors import DataError


def _check_layout(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64))


class RandomWindows:
    """Batches of windows at uniformly random offsets, for models without memory.

    Rank r draws from its own generator, seeded by (seed, rank). Windows may cross
    document boundaries (the EOD between them is part of the data).
    """

    def __init__(
        self, split: TokenSplit, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        _check_layout(batch_size, seq_len, rank, world_size)
        if len(split) < seq_len + 1:
            raise DataError(
                f"split {split.name!r} has {len(split)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}: "
                f"use a shorter seq_len or more data"
            )
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rng = np.random.default_rng([seed, rank])
        self.step = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each LongTensor (B, T); y[:, t] is the token after x[:, t]."""
        starts = self.rng.integers(0, len(self.split) - self.seq_len, size=self.batch_size)  # (B,)
        window = self.split.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # (B, T + 1)
        self.step += 1
        return _long(window[:, :-1]), _long(window[:, 1:])

    def state_dict(self) -> dict:
        return {"step": self.step, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.rng.bit_generator.state = state["rng"]


class Segment(NamedTuple):
    """One step of a `SegmentStreams` loader: all (B, T') tensors, T' = seq_len except a final
    partial segment."""

    x: torch.Tensor  # (B, T') int64 inputs
    y: torch.Tensor  # (B, T') int64 next-token targets
    doc_start: torch.Tensor  # (B, T') bool: a new document (or stream) begins at this position
    valid: torch.Tensor  # (B, T') bool: False on padding after a part's end (wrap=False only)


class SegmentStreams:
    """The base of loaders that hand a model with memory one `Segment` per step, each row
    continuing its own stream: `Streams` here, the task streams of memlm.tasks.

    A subclass implements `next_segment()`; this base checks the layout, counts the steps and
    gives it `next_batch()`, iteration and a resumable `state_dict()`: the step, the `layout`
    (every setting that decides the data, which a resume must match) and whatever
    `position_state()` adds.
    """

    name = "streams"
    """What the loader is called in error messages."""

    def __init__(self, batch_size: int, seq_len: int, rank: int, world_size: int, layout: dict):
        _check_layout(batch_size, seq_len, rank, world_size)
        self.batch_size, self.seq_len, self.layout = batch_size, seq_len, layout
        self.step = 0

    @property
    def exhausted(self) -> bool:
        """True once a finite pass has returned every token (never for endless streams)."""
        return False

    def next_segment(self) -> Segment:
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, doc_start) of `next_segment` (LongTensor, LongTensor, BoolTensor, each (B, T))."""
        return self.next_segment()[:3]

    def __iter__(self) -> SegmentStreams:
        return self

    def __next__(self) -> Segment:
        return self.next_segment()

    # ----- resuming: subclasses with more to restore than the step override these -----------
    def position_state(self) -> dict:
        """Where the rows are beyond the step count (none here)."""
        return {}

    def load_position_state(self, state: dict) -> None:
        """Restore what `position_state` returned."""

    def saved_layout(self, layout: dict) -> dict:
        """A saved layout as this version reads it (defaults for keys older versions lacked)."""
        return layout

    def state_dict(self) -> dict:
        return {"step": self.step, **self.position_state(), "layout": dict(self.layout)}

    def load_state_dict(self, state: dict) -> None:
        saved = self.saved_layout(state["layout"])
        if saved != self.layout:
            raise DataError(f"cannot resume {self.name} saved with {saved} into {self.layout}")
        self.step = state["step"]
        self.load_position_state(state)


class Streams(SegmentStreams):
    """`batch_size` contiguous token streams per rank, for models with memory.

    wrap=True (training): endless; each row cycles through its part.
    wrap=False (evaluation): one pass; iterate until `exhausted`. Every token of the split is
    an input exactly once and a target exactly once over all rows and ranks. Parts differ by
    at most one token, so rows that end early are padded (x = y = EOD, valid = False); the
    last segment is only as long as the longest part still needs, and every rank takes the
    same number of steps with the same shapes.
    """

    def __init__(
        self,
        split: TokenSplit,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        wrap: bool = True,
    ):
        n, parts = len(split), batch_size * world_size
        super().__init__(batch_size, seq_len, rank, world_size, {
            "tokens": n, "batch_size": batch_size, "seq_len": seq_len, "rank": rank, "world_size": world_size,
            "wrap": wrap})
        if n == 0 or (wrap and n // parts < seq_len):
            raise DataError(
                f"split {split.name!r} has {n} tokens, too few for {parts} streams of seq_len {seq_len} "
                f"(needs {parts * seq_len}): use a smaller batch size or seq_len, or more data"
            )
        bounds = np.arange(parts + 1, dtype=np.int64) * n // parts  # (P + 1,) part boundaries
        rows = rank * batch_size + np.arange(batch_size)
        self.split, self.wrap = split, wrap
        self.start = bounds[rows]  # (B,) first token of each row's part
        self.length = bounds[rows + 1] - self.start  # (B,)
        self.longest = -(-n // parts)  # longest part over all ranks: the same step count everywhere

    @property
    def exhausted(self) -> bool:
        """True once a wrap=False pass has returned every token (never for wrap=True)."""
        return not self.wrap and self.step * self.seq_len >= self.longest

    def next_segment(self) -> Segment:
        """The next `Segment`; raises StopIteration when a wrap=False pass is exhausted."""
        if self.exhausted:
            raise StopIteration
        tokens, n, offset = self.split.tokens, len(self.split), self.step * self.seq_len
        width = self.seq_len if self.wrap else min(self.seq_len, self.longest - offset)
        local = offset + np.arange(width)[None, :]  # (1, T') position within the part
        if self.wrap:
            local = local % self.length[:, None]  # (B, T')
        valid = local < self.length[:, None]  # (B, T')
        pos = (self.start[:, None] + local) % n  # (B, T') position in the split
        eod = self.split.eod
        x = np.where(valid, tokens[pos], eod)
        y = np.where(valid, tokens[(pos + 1) % n], eod)
        doc_start = valid & ((local == 0) | (tokens[(pos - 1) % n] == eod))
        self.step += 1
        return Segment(_long(x), _long(y), torch.from_numpy(doc_start), torch.from_numpy(valid))
