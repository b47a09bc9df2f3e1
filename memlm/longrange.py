"""Long-range recall: a byte-level task that only a model with memory can solve, scored by distance.

Each document defines key/value pairs on its first lines, then `distance` bytes of filler,
then asks for one value again::

    key 4821 is 73915.\\n            <- definitions (`pairs` lines, distinct keys, random digits)
    The table reads a quiet ...\\n    <- filler: exactly `distance` bytes of text lines, no digits
        return self.window.close\\n
    key 4821 is 73915.\\n            <- query: the answer is the value digits after "key 4821 is "

The answer is scored by teacher forcing: the model reads the document up to each answer
digit and we take its log-likelihood of the right digit and whether the right digit is the
argmax. A document counts as recalled when every digit is the argmax (`accuracy`);
`digit_nll` is the mean negative log-likelihood per digit in nats (guessing among the ten
digits scores ln 10 = 2.303). The filler holds no digit, so nothing but the definition
tells the value: a model that cannot see that far back can only guess.

Lineage. This is the passkey retrieval test of "Landmark Attention: Random-Access Infinite
Context Length for Transformers" (Mohtashami & Jaggi, arXiv 2305.16300) crossed with the
associative recall task of "Hungry Hungry Hippos: Towards Language Modeling with State Space
Models" (Fu, Dao et al., arXiv 2212.14052). Departures: the passkey test hides one number
("The pass key is 12345. Remember it.") in a few filler sentences repeated many times and asks
for it by generation; here the filler is varied (random Python-like or English lines from a
fixed word list, so it is neither a repeat to skip nor a source of digits), the number is
looked up by a key, optionally among `pairs` distractor definitions (associative recall),
the distance is an exact byte count, and the answer is scored by teacher forcing (exact
match and log-likelihood per digit).
H3's associative recall uses short sequences of single-token keys and values with nothing in
between; here keys and values are multi-byte digit strings in plain text and the gap spans
many segments, so the task measures memory across segments rather than in-context lookup.

Models with memory (`model.config.stateful`) read each document segment by segment with a
carried state (segments of `seq_len` from the document's start). Models without memory read
it in non-overlapping windows of `seq_len`, as `memlm.eval.evaluate` does: a digit sees only
the earlier bytes of its own window. `RecallStreams` feeds endless streams of such documents
(each ended by EOD) to a trainer, with the interface of `memlm.data.Streams`.

Training. Language modelling of these documents does not teach recall to a small model: the
answer digits are a few bytes among hundreds of filler bytes, and copying a value from a
definition matched by a multi-byte key is an induction-head circuit that the loss of the
filler does not call for. `RecallStreams` therefore departs from language modelling in three
ways. Measured on CPU with 2 layers, width 128, seq_len 128, batch 16, lr 2e-3 (cosine),
one seed per line unless said:

* the loss is the answer alone (`targets="answers"`): targets are IGNORE except on the
  queried value digits, as synthetic recall tasks train (the multi-query associative recall
  of "Zoology: Measuring and Improving Recall in Efficient Language Models", Arora et al.,
  arXiv 2312.04927, scores only the values after its queries), so the training loss is the
  scorer's digit NLL. With every byte trained instead, digit NLL stayed at 2.30 at distances
  0, 16 and 64 after 1,500 steps (and with 2-digit keys and 3-digit values too); with the
  answers only, the same run recalled all three perfectly by step 900. A batch holding no
  answer digit (every row inside filler or definitions) would leave the loss empty (NaN), so
  it is trained on all its targets instead, as language modelling;
* distances spread log-uniformly from 0 to the longest listed one (`spread=True`,
  `spread_distance`): about as many documents per octave, so half of them are short enough
  to learn the copy inside a window, which the long ones then extend through the memory. A
  memory model (seed-xl, memory 128) trained only at distances 192 and 320 stayed at chance
  after 1,500 steps;
* every document starts at a segment start (`align=True`): after its EOD the row is padded
  up to the next multiple of `seq_len`, so documents are read in training as they are
  scored: the memory is reset at each document's start, and no earlier document's lines are
  in view. Unaligned, that memory model had not learnt distance 16 after 1,200-1,500 steps
  in three seeds of three; aligned, one seed of three had (and the other two did by 3,000).
  For models without memory alignment made no clear difference (better in two seeds of
  three, worse in one).

Learning is a late, seed-dependent jump (at 1,000 to 2,500 steps here), so give a small
model a few thousand steps. Through `memlm train --task recall` (3,000 steps, the settings
above, 6 and 8 minutes on one CPU core): seed-tiny without memory, distances 16 and 64:
accuracy 0.55 and 0.42 (digit NLL 0.30 and 0.38; other seeds reached 1.0; with
`--recall_targets all` instead: 0.00 and 0.00, digit NLL 2.30 and 2.31); seed-xl-tiny
(memory 128), distances 16 / 64 / 192 / 320: accuracy 1.00 / 1.00 / 0.94 / 0.00 with its
memory, 1.00 / 1.00 / 0.00 / 0.00 without (digit NLL at 192: 0.05 against 2.37).

The documents themselves, their scoring and their distances are unchanged by these choices:
training documents are drawn from their own seeds and never coincide with evaluation ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memlm.data import EOD, DataError, Segment

DISTANCES = (64, 256, 1024, 4096)
"""Default filler lengths (bytes) of `recall_accuracy`."""


def distances_for(seq_len: int) -> tuple[int, ...]:
    """Filler lengths that tell a segment of `seq_len` from memory: 1/4 and 3/4 of a segment (a
    window without memory sees them), 3/2 segments (the previous segment: a Transformer-XL memory
    of one segment holds it) and 3 segments (only a longer reach: kNN memory, a longer or deeper
    recurrent memory). For 512: 128, 384, 768, 1536."""
    if seq_len < 4:
        raise ValueError(f"seq_len must be at least 4, got {seq_len}")
    return (seq_len // 4, 3 * seq_len // 4, 3 * seq_len // 2, 3 * seq_len)
FILLER_KINDS = ("mixed", "english", "python")
TARGETS = ("answers", "all")
"""Which targets `RecallStreams` trains: the answer digits only, or every byte (see RecallStreams)."""
IGNORE = -100
"""Target id of a position that is not trained (the ignore_index of the models' cross-entropy)."""

_EVAL_STREAM, _TRAIN_STREAM = 0, 1  # seed domains: evaluation documents never repeat training ones

WORDS = (
    "the a an of to in on at by for with from into over under after before between through "
    "and or but not if then else when while where because so than as also only just very "
    "model layer memory table value window stream segment token byte text line file record "
    "reader writer buffer cache queue list map set tree node edge graph path route state "
    "start end head tail block frame page sheet column row field entry item name label tag "
    "green blue red quiet bright small large early late long short open closed empty full "
    "river stone field garden house road bridge tower cloud rain snow wind light shadow "
    "reads writes holds keeps moves turns opens closes finds sends takes makes gives shows "
    "runs walks waits looks grows falls rises carries follows returns builds counts marks "
    "slowly quickly often rarely always never again together apart inside outside above below"
).split()
"""Filler vocabulary: lower-case letters only (no digits, and not the word that starts a definition)."""

NAMES = (
    "data items result value config buffer parser reader writer cache queue index node parent "
    "child options handler source target context record window stream offset length count "
    "total message header payload request response token mask state layer block frame"
).split()
"""Identifiers of the Python-like filler lines."""

_PY_TEMPLATES = (
    "{a} = {b}({c}, {d})",
    "{a} = self.{b}.{c}",
    "def {a}_{b}(self, {c}, {d}=None):",
    "    return {a}.{b}({c})",
    "    if {a} is not None and {b}:",
    "        {a}.append({b}[{c}])",
    "for {a} in {b}.{c}():",
    "    {a}[{b}] = {c}.get({d})",
    "class {A}{B}({C}):",
    "    self.{a} = {b} or {c}",
    "# {w}",
    "    raise ValueError(\"{w}\")",
    "    yield {a}, {b}",
    "while not {a}.{b}:",
    "    {a} += len({b})",
    "import {a}.{b}",
)


@dataclass(frozen=True)
class RecallDocument:
    """One document of the task. Offsets index `text`; every definition and the query are
    `key <key> is <value>.` lines."""

    text: bytes
    """The whole document (ASCII, ends with the query line's newline)."""
    distance: int
    """Bytes of filler: exactly `query_offset - filler_offset`."""
    answer: bytes
    """The value digits the query asks for."""
    answer_offset: int
    """Offset of the answer's first digit (just after the query's `key <key> is `)."""
    query_offset: int
    """Offset of the query line."""
    filler_offset: int
    """Offset of the filler, i.e. the end of the definition lines."""
    definition_offset: int
    """Offset of the queried key's definition line."""
    key: bytes
    """The queried key's digits."""

    @property
    def ids(self) -> torch.Tensor:
        """The text as byte ids, LongTensor (L,)."""
        return torch.frombuffer(bytearray(self.text), dtype=torch.uint8).long()


# ----- documents -------------------------------------------------------------------------

def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(map(str, rng.integers(0, 10, size=n)))


def _english_line(rng: np.random.Generator) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(5, 13)))]
    return " ".join(words).capitalize() + "."


def _python_line(rng: np.random.Generator) -> str:
    template = _PY_TEMPLATES[int(rng.integers(len(_PY_TEMPLATES)))]
    a, b, c, d, e, f = (NAMES[i] for i in rng.integers(0, len(NAMES), size=6))
    words = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(3, 8))))
    return template.format(a=a, b=b, c=c, d=d, A=a.capitalize(), B=e.capitalize(), C=f.capitalize(), w=words)


def filler(rng: np.random.Generator, length: int, kind: str = "mixed") -> str:
    """Exactly `length` bytes of text lines drawn from `rng`: whole lines while they fit, the
    last one cut to fit and ended with a newline (length 0 = empty). No digits."""
    if kind not in FILLER_KINDS:
        raise ValueError(f"filler kind must be one of {FILLER_KINDS}, got {kind!r}")
    if length < 0:
        raise ValueError(f"distance must be >= 0, got {length}")
    lines, size = [], 0
    while size < length:
        python = kind == "python" or (kind == "mixed" and rng.random() < 0.5)
        line = (_python_line(rng) if python else _english_line(rng)) + "\n"
        lines.append(line)
        size += len(line)
    text = "".join(lines)
    return text if len(text) == length else text[:length - 1] + "\n"


def _document(rng: np.random.Generator, distance: int, pairs: int, key_digits: int, value_digits: int,
              kind: str) -> RecallDocument:
    if pairs < 1 or key_digits < 1 or value_digits < 1:
        raise ValueError(f"pairs, key_digits and value_digits must be >= 1, got {pairs}, {key_digits}, {value_digits}")
    if pairs > 10 ** key_digits:
        raise ValueError(f"{pairs} distinct keys do not fit in {key_digits} digits")
    keys: list[str] = []
    while len(keys) < pairs:
        key = _digits(rng, key_digits)
        if key not in keys:
            keys.append(key)
    values = [_digits(rng, value_digits) for _ in keys]
    asked = int(rng.integers(pairs))
    line_len = len(f"key {keys[0]} is {values[0]}.\n")
    definitions = "".join(f"key {k} is {v}.\n" for k, v in zip(keys, values))
    body = filler(rng, distance, kind)
    prefix = f"key {keys[asked]} is "
    text = definitions + body + prefix + values[asked] + ".\n"
    query = len(definitions) + len(body)
    return RecallDocument(
        text=text.encode("ascii"), distance=distance, answer=values[asked].encode("ascii"),
        answer_offset=query + len(prefix), query_offset=query, filler_offset=len(definitions),
        definition_offset=asked * line_len, key=keys[asked].encode("ascii"))


def make_documents(n: int, distance: int, seed: int = 0, *, pairs: int = 1, key_digits: int = 4,
                   value_digits: int = 5, filler_kind: str = "mixed") -> list[RecallDocument]:
    """`n` documents whose query comes `distance` filler bytes after the definitions.

    Document i depends only on (seed, distance, i) and the format arguments, so a shorter
    list is a prefix of a longer one. All documents of one call have the same length and the
    same answer offset (the format is fixed-width), so they batch with aligned positions.
    """
    return [_document(np.random.default_rng([seed, _EVAL_STREAM, distance, i]), distance, pairs, key_digits,
                      value_digits, filler_kind) for i in range(n)]


# ----- scoring ---------------------------------------------------------------------------

def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def score_documents(model, documents: Sequence[RecallDocument], batch_size: int = 16, *,
                    stateful: bool | None = None, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Teacher-forced scores of every answer digit: {"logprob": (N, D) float64 log-likelihood of
    the right digit, "correct": (N, D) bool, the right digit is the argmax (first index on ties)}.

    stateful: None = `model.config.stateful`. True: segments of `seq_len` from the document's
        start, carrying `out.state` from `model.init_state`. False: independent non-overlapping
        windows of `seq_len` (only the windows that hold an answer digit's prediction are run).
    seq_len: None = `model.config.seq_len`.
    Documents are batched `batch_size` at a time in order; each batch must share the answer
    offset and length (true of the documents of one `make_documents` call).
    Runs in the caller's precision (wrap it in autocast for bf16).
    """
    stateful = model.config.stateful if stateful is None else stateful
    T = seq_len or model.config.seq_len
    device = _device(model)
    logprob, correct = [], []
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(documents), batch_size):
            batch = documents[first:first + batch_size]
            lp, ok = _score_batch(model, batch, T, stateful, device)
            logprob.append(lp)
            correct.append(ok)
    finally:
        model.train(was_training)
    if not logprob:
        return {"logprob": torch.zeros(0, 0, dtype=torch.float64), "correct": torch.zeros(0, 0, dtype=torch.bool)}
    return {"logprob": torch.cat(logprob).cpu(), "correct": torch.cat(correct).cpu()}


def _score_batch(model, batch: Sequence[RecallDocument], T: int, stateful: bool, device: torch.device):
    offset, digits = batch[0].answer_offset, len(batch[0].answer)
    if any(d.answer_offset != offset or len(d.answer) != digits for d in batch):
        raise ValueError("documents of one batch must share the answer offset and length (use one make_documents call)")
    need = offset + digits - 1  # inputs 0..need-1; input p predicts byte p + 1; answers: p in [offset - 1, need)
    ids = torch.stack([d.ids[:offset + digits] for d in batch]).to(device)  # (B, offset + D)
    targets = ids[:, offset:]  # (B, D)
    B = len(batch)
    logprob = torch.empty(B, digits, dtype=torch.float64, device=device)
    correct = torch.empty(B, digits, dtype=torch.bool, device=device)

    def collect(logits: torch.Tensor, start: int) -> None:
        """Scores of the answer predictions among positions [start, start + logits.shape[1])."""
        lo, hi = max(start, offset - 1), min(start + logits.shape[1], need)
        if lo >= hi:
            return
        j = slice(lo - (offset - 1), hi - (offset - 1))  # digit indices
        picked = logits[:, lo - start:hi - start].double()  # (B, n, vocab)
        logprob[:, j] = picked.log_softmax(-1).gather(-1, targets[:, j, None]).squeeze(-1)
        correct[:, j] = picked.argmax(-1) == targets[:, j]

    if stateful:
        state = model.init_state(B, device=device)
        for start in range(0, need, T):
            out = model(ids[:, start:min(start + T, need)], state=state)
            collect(out.logits, start)
            state = out.state
    else:
        for window in range((offset - 1) // T, (need - 1) // T + 1):
            start = window * T
            collect(model(ids[:, start:min(start + T, need)]).logits, start)
    return logprob, correct


def recall_accuracy(model, distances: Sequence[int] = DISTANCES, n: int = 64, batch_size: int = 16, seed: int = 0,
                    *, stateful: bool | None = None, seq_len: int | None = None, pairs: int = 1,
                    key_digits: int = 4, value_digits: int = 5, filler_kind: str = "mixed") -> dict:
    """Recall accuracy of `model` by distance on `n` documents per distance (see the module docstring).

    Returns {"task": "recall", "stateful", "seq_len", "pairs", "value_digits", "seed",
    "by_distance": [{"distance", "accuracy", "digit_nll", "documents"}, ...]}: accuracy is the
    fraction of documents whose every answer digit is the argmax, digit_nll the mean negative
    log-likelihood per answer digit in nats. `stateful=False` scores a memory model without
    its memory (windowed), the same model's no-memory baseline. `markdown(result)` formats it.
    """
    stateful = bool(model.config.stateful if stateful is None else stateful)
    T = seq_len or model.config.seq_len
    rows = []
    for distance in distances:
        docs = make_documents(n, distance, seed, pairs=pairs, key_digits=key_digits, value_digits=value_digits,
                              filler_kind=filler_kind)
        scores = score_documents(model, docs, batch_size, stateful=stateful, seq_len=T)
        logprob = scores["logprob"]
        rows.append({"distance": int(distance),
                     "accuracy": float(scores["correct"].all(dim=1).double().mean()) if n else None,
                     "digit_nll": _mean_nll(logprob) if n else None,
                     "documents": len(docs)})
    return {"task": "recall", "stateful": stateful, "seq_len": T, "pairs": pairs, "value_digits": value_digits,
            "seed": seed, "by_distance": rows}


def _mean_nll(logprob: torch.Tensor) -> float:
    """-mean(logprob), as first value + mean of the offsets from it: exact for equal values
    (a uniform model scores ln(vocab) to the last bit) and no worse elsewhere."""
    first = logprob.flatten()[0]
    return float(-(first + (logprob - first).mean()))


def markdown(result: dict) -> str:
    """A markdown table of a `recall_accuracy` result, one row per distance."""
    mode = "with memory (stateful)" if result.get("stateful") else "without memory (windowed)"
    lines = [f"recall of {result.get('value_digits', '?')}-digit values, {mode}, seq_len {result.get('seq_len', '?')}",
             "",
             "| distance (bytes) | documents | accuracy | digit NLL (nats) |",
             "|---:|---:|---:|---:|"]
    for row in result["by_distance"]:
        acc = f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "-"
        nll = f"{row['digit_nll']:.3f}" if row["digit_nll"] is not None else "-"
        lines.append(f"| {row['distance']:,} | {row['documents']} | {acc} | {nll} |")
    lines += ["", "Guessing among the ten digits: accuracy 1e-{0} per document, digit NLL ln 10 = 2.303.".format(
        result.get("value_digits", 5))]
    return "\n".join(lines)


# ----- training streams ------------------------------------------------------------------

_OLD_LAYOUT = {"targets": "all", "spread": False, "align": False}
"""How streams saved without these layout keys were made (plain language modelling)."""


def spread_distance(rng: np.random.Generator, longest: int) -> int:
    """A distance in [0, longest], log-uniform: floor((longest + 2) ** u) - 1 for u uniform in
    [0, 1), so each octave [2^k - 1, 2^(k+1) - 1) gets about the same share of documents
    (with longest 2048: 9% at distance 0, 55% below 64)."""
    return min(longest, int(np.exp(rng.random() * np.log(longest + 2))) - 1)


class RecallStreams:
    """`batch_size` endless streams of recall documents per rank, each followed by EOD, with
    the interface of `memlm.data.Streams` (wrap=True): `next_segment() -> Segment(x, y,
    doc_start, valid)` and `next_batch() -> (x, y, doc_start)`, each (B, T): y the token after
    x where it is trained and IGNORE (-100, the models' ignore_index) elsewhere, doc_start
    True on a document's first byte, valid False on alignment padding. The module docstring
    ("Training") says why each default departs from plain language modelling.

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
    `make_documents`. `state_dict` is the document index and offset of each row, so resuming
    is exact.
    """

    def __init__(self, batch_size: int, seq_len: int, distances: Sequence[int] = DISTANCES, seed: int = 0, *,
                 rank: int = 0, world_size: int = 1, pairs: int = 1, key_digits: int = 4, value_digits: int = 5,
                 filler_kind: str = "mixed", targets: str = "answers", spread: bool = True, align: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        if not distances or min(distances) < 0:
            raise DataError(f"distances must be a non-empty list of byte counts >= 0, got {list(distances)}")
        if targets not in TARGETS:
            raise DataError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.batch_size, self.seq_len, self.distances = batch_size, seq_len, tuple(int(d) for d in distances)
        self.seed, self.rows = seed, [rank * batch_size + b for b in range(batch_size)]
        self.targets, self.spread, self.align = targets, spread, align
        self.format = dict(pairs=pairs, key_digits=key_digits, value_digits=value_digits, kind=filler_kind)
        self.layout = {"batch_size": batch_size, "seq_len": seq_len, "distances": list(self.distances), "seed": seed,
                       "rank": rank, "world_size": world_size, "pairs": pairs, "key_digits": key_digits,
                       "value_digits": value_digits, "filler_kind": filler_kind, "targets": targets,
                       "spread": spread, "align": align}
        self.step = 0
        self.doc = [0] * batch_size  # per row: index of the document holding the next token
        self.offset = [0] * batch_size  # per row: offset of the next token in that document (+ EOD)
        self._cache: list[dict[int, tuple[np.ndarray, ...]]] = [{} for _ in range(batch_size)]
        self.exhausted = False

    def document(self, row: int, index: int) -> RecallDocument:
        """Document `index` of global row `row`."""
        rng = np.random.default_rng([self.seed, _TRAIN_STREAM, row, index])
        if self.spread:
            distance = spread_distance(rng, max(self.distances))
        else:
            distance = self.distances[int(rng.integers(len(self.distances)))]
        return _document(rng, distance, **self.format)

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

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, doc_start): LongTensor, LongTensor, BoolTensor, each (B, T)."""
        return self.next_segment()[:3]

    def __iter__(self) -> RecallStreams:
        return self

    def __next__(self) -> Segment:
        return self.next_segment()

    def state_dict(self) -> dict:
        return {"step": self.step, "doc": list(self.doc), "offset": list(self.offset), "layout": dict(self.layout)}

    def load_state_dict(self, state: dict) -> None:
        saved = {**_OLD_LAYOUT, **state["layout"]}  # streams saved before these options existed
        if saved != self.layout:
            raise DataError(f"cannot resume recall streams saved with {saved} into {self.layout}")
        self.step, self.doc, self.offset = state["step"], list(state["doc"]), list(state["offset"])
        self._cache = [{} for _ in range(self.batch_size)]


__all__ = ["DISTANCES", "IGNORE", "TARGETS", "RecallDocument", "RecallStreams", "filler", "make_documents", "markdown",
           "recall_accuracy", "score_documents", "spread_distance"]
