"""Training on the long-range recall task (memlm.tasks.longrange): endless streams of its
documents, each ended by EOD, as a `memlm.data.SegmentStreams` loader (`memlm train --task recall`).

Language modelling of these documents does not teach recall to a small model: the answer
digits are a few bytes among hundreds of filler bytes, and copying a value from a definition
matched by a multi-byte key is an induction-head circuit that the loss of the filler does not
call for. `RecallStreams` therefore departs from language modelling in three ways (the CPU
measurements behind each choice are in BENCHMARKS.md, "Training runs and recall"):

* the loss is the answer alone (`targets="answers"`): targets are IGNORE except on the
  queried value digits, as synthetic recall tasks train (the multi-query associative recall
  of "Zoology: Measuring and Improving Recall in Efficient Language Models", Arora et al.,
  arXiv 2312.04927, scores only the values after its queries), so the training loss is the
  scorer's digit NLL. A batch holding no answer digit (every row inside filler or
  definitions) would leave the loss empty (NaN), so it is trained on all its targets instead,
  as language modelling;
* distances spread log-uniformly from 0 to the longest listed one (`spread=True`,
  `spread_distance`): about as many documents per octave, so half of them are short enough
  to learn the copy inside a window, which the long ones then extend through the memory;
* every document starts at a segment start (`align=True`): after its EOD the row is padded
  up to the next multiple of `seq_len`, so documents are read in training as they are
  scored: the memory is reset at each document's start, and no earlier document's lines are
  in view.

Learning is a late, seed-dependent jump, so give a small model a few thousand steps. The
documents themselves, their scoring and their distances are unchanged by these choices:
training documents are drawn from their own seeds and never coincide with evaluation ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from memlm.data import EOD, DataError, Segment, SegmentStreams
from memlm.tasks.longrange import DISTANCES, TRAIN_STREAM, RecallDocument, make_document

TARGETS = ("answers", "all")
"""Which targets `RecallStreams` trains: the answer digits only, or every byte (see RecallStreams)."""
IGNORE = -100
"""Target id of a position that is not trained (the ignore_index of the models' cross-entropy)."""
OLD_LAYOUT = {"targets": "all", "spread": False, "align": False}
"""How streams saved without these layout keys were made (plain language modelling)."""


def spread_distance(rng: np.random.Generator, longest: int) -> int:
    """A distance in [0, longest], log-uniform: floor((longest + 2) ** u) - 1 for u uniform in
    [0, 1), so each octave [2^k - 1, 2^(k+1) - 1) gets about the same share of documents
    (with longest 2048: 9% at distance 0, 55% below 64)."""
    return min(longest, int(np.exp(rng.random() * np.log(longest + 2))) - 1)


class RecallStreams(SegmentStreams):
    """`batch_size` endless streams of recall documents per rank, each followed by EOD:
    `next_segment() -> Segment(x, y, doc_start, valid)` and `next_batch() -> (x, y, doc_start)`,
    each (B, T): y the token after x where it is trained and IGNORE (-100, the models'
    ignore_index) elsewhere, doc_start True on a document's first byte, valid False on
    alignment padding. The module docstring says why each default departs from plain language
    modelling.

    targets: which targets are trained (`TARGETS`). "answers": only the answer digits of the
        queries, so the loss is the scorer's digit NLL; a batch that holds no answer digit in
        any row (all filler: frequent with long distances) is trained on all its targets
        instead, since a loss over no target is undefined (NaN). "all": every target, plain
        language modelling of the documents.
    spread: True = each document's distance is log-uniform in [0, max(distances)]
        (`spread_distance`); False = uniform among `distances`.
    align: True = every document starts at a segment start: its EOD is followed by EOD padding
        up to the next multiple of seq_len (valid False, no targets from it; the EOD's own
        target is the first padding EOD), and no target crosses from one document into the
        next. False = documents follow one another directly (under targets="all" every target
        is trained, EOD -> next document included).
    Row r (global row rank * batch_size + b) holds documents k = 0, 1, ...; document k
    depends only on (seed, r, k) and never coincides with an evaluation document of
    `make_documents`. `state_dict` holds the document index and offset of each row, so
    resuming is exact.
    """

    name = "recall streams"

    def __init__(self, batch_size: int, seq_len: int, distances: Sequence[int] = DISTANCES, seed: int = 0, *,
                 rank: int = 0, world_size: int = 1, pairs: int = 1, key_digits: int = 4, value_digits: int = 5,
                 filler_kind: str = "mixed", targets: str = "answers", spread: bool = True, align: bool = True):
        distances = tuple(int(d) for d in distances)
        super().__init__(batch_size, seq_len, rank, world_size, {
            "batch_size": batch_size, "seq_len": seq_len, "distances": list(distances), "seed": seed, "rank": rank,
            "world_size": world_size, "pairs": pairs, "key_digits": key_digits, "value_digits": value_digits,
            "filler_kind": filler_kind, "targets": targets, "spread": spread, "align": align})
        if not distances or min(distances) < 0:
            raise DataError(f"distances must be a non-empty list of byte counts >= 0, got {list(distances)}")
        if targets not in TARGETS:
            raise DataError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.distances, self.seed = distances, seed
        self.rows = [rank * batch_size + b for b in range(batch_size)]
        self.targets, self.spread, self.align = targets, spread, align
        self.format = dict(pairs=pairs, key_digits=key_digits, value_digits=value_digits, kind=filler_kind)
        self.doc = [0] * batch_size  # per row: index of the document holding the next token
        self.offset = [0] * batch_size  # per row: offset of the next token in that document (+ EOD)
        self._cache: list[dict[int, tuple[np.ndarray, ...]]] = [{} for _ in range(batch_size)]

    def document(self, row: int, index: int) -> RecallDocument:
        """Document `index` of global row `row`."""
        rng = np.random.default_rng([self.seed, TRAIN_STREAM, row, index])
        if self.spread:
            distance = spread_distance(rng, max(self.distances))
        else:
            distance = self.distances[int(rng.integers(len(self.distances)))]
        return make_document(rng, distance, **self.format)

    def _tokens(self, b: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document `index` of row b as (tokens, answer, real): its bytes, EOD and (align) EOD
        padding to a multiple of seq_len; True on its answer digits; True on its bytes and EOD."""
        cache = self._cache[b]
        if index not in cache:
            doc = self.document(self.rows[b], index)
            n = len(doc.text) + 1
            size = -(-n // self.seq_len) * self.seq_len if self.align else n
            tokens = np.full(size, EOD, dtype=np.int64)
            tokens[:n - 1] = np.frombuffer(doc.text, np.uint8)
            answer = np.zeros(size, dtype=bool)
            answer[doc.answer_offset:doc.answer_offset + len(doc.answer)] = True
            cache[index] = tokens, answer, np.arange(size) < n
        return cache[index]

    def _read(self, b: int, count: int) -> tuple[np.ndarray, ...]:
        """The next `count` positions of row b as (tokens, offsets within their documents,
        answer, real) (no advance)."""
        parts = []
        index, offset = self.doc[b], self.offset[b]
        while count > 0:
            tokens, answer, real = self._tokens(b, index)
            end = min(len(tokens), offset + count)
            parts.append((tokens[offset:end], np.arange(offset, end), answer[offset:end], real[offset:end]))
            count -= end - offset
            index, offset = index + 1, 0
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _advance(self, b: int, count: int) -> None:
        offset = self.offset[b] + count
        while offset >= len(self._tokens(b, self.doc[b])[0]):
            offset -= len(self._tokens(b, self.doc[b])[0])
            self._cache[b].pop(self.doc[b], None)
            self.doc[b] += 1
        self.offset[b] = offset

    def next_segment(self) -> Segment:
        T = self.seq_len
        xs, ys, starts, answers, trained, valid = [], [], [], [], [], []
        for b in range(self.batch_size):
            tokens, offsets, answer, real = self._read(b, T + 1)
            xs.append(tokens[:T])
            ys.append(tokens[1:])
            starts.append(offsets[:T] == 0)
            answers.append(answer[1:])
            valid.append(real[:T])
            # aligned: no target from padding, nor from one document into the next (EOD -> EOD is
            # one, so every row of a segment keeps a target)
            trained.append(real[:T] & (offsets[1:] == offsets[:T] + 1) if self.align else np.ones(T, dtype=bool))
            self._advance(b, T)
        self.step += 1
        y, answer = np.stack(ys), np.stack(answers)
        live = answer if self.targets == "answers" and answer.any() else np.stack(trained)
        x = torch.from_numpy(np.stack(xs))
        return Segment(x, torch.from_numpy(np.where(live, y, IGNORE)), torch.from_numpy(np.stack(starts)),
                       torch.from_numpy(np.stack(valid)))

    # ----- resuming -----------------------------------------------------------------------
    def position_state(self) -> dict:
        return {"doc": list(self.doc), "offset": list(self.offset)}

    def load_position_state(self, state: dict) -> None:
        self.doc, self.offset = list(state["doc"]), list(state["offset"])
        self._cache = [{} for _ in range(self.batch_size)]

    def saved_layout(self, layout: dict) -> dict:
        return {**OLD_LAYOUT, **layout}  # streams saved before these options existed


__all__ = ["IGNORE", "OLD_LAYOUT", "TARGETS", "RecallStreams", "spread_distance"]
