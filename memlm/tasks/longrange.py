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
the earlier bytes of its own window. Training on these documents is `memlm.tasks.recall_streams`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memlm.tables import markdown_table

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
EVAL_STREAM, TRAIN_STREAM = 0, 1
"""Seed domains of the documents (the second seed entry): evaluation documents never repeat training ones."""

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


def make_document(rng: np.random.Generator, distance: int, pairs: int = 1, key_digits: int = 4,
                  value_digits: int = 5, kind: str = "mixed") -> RecallDocument:
    """One document drawn from `rng` (see the module docstring for its layout)."""
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
    return [make_document(np.random.default_rng([seed, EVAL_STREAM, distance, i]), distance, pairs, key_digits,
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
    its memory (windowed), the same model's no-memory baseline. `recall_markdown(result)` formats it.
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


def recall_by_mode(model, distances: Sequence[int], n: int = 64, batch_size: int = 16, seed: int = 0) -> dict:
    """`recall_accuracy` of the model with its memory ("memory") and, for a model with memory,
    also without it ("windowed"), in eval mode (the model's mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        modes = [True, False] if model.config.stateful else [False]
        return {"memory" if stateful else "windowed": recall_accuracy(model, distances, n, batch_size, seed=seed,
                                                                     stateful=stateful) for stateful in modes}
    finally:
        model.train(was_training)


def _mean_nll(logprob: torch.Tensor) -> float:
    """-mean(logprob), as first value + mean of the offsets from it: exact for equal values
    (a uniform model scores ln(vocab) to the last bit) and no worse elsewhere."""
    first = logprob.flatten()[0]
    return float(-(first + (logprob - first).mean()))


def recall_markdown(result: dict) -> str:
    """A `recall_accuracy` result as markdown: a title line, one table row per distance, chance."""
    mode = "with memory (stateful)" if result.get("stateful") else "without memory (windowed)"
    lines = [f"recall of {result.get('value_digits', '?')}-digit values, {mode}, seq_len {result.get('seq_len', '?')}",
             ""]
    rows = [[f"{row['distance']:,}", str(row["documents"]),
             f"{row['accuracy']:.3f}" if row["accuracy"] is not None else "-",
             f"{row['digit_nll']:.3f}" if row["digit_nll"] is not None else "-"] for row in result["by_distance"]]
    lines += markdown_table(["distance (bytes)", "documents", "accuracy", "digit NLL (nats)"], rows, right=True)
    lines += ["", "Guessing among the ten digits: accuracy 1e-{0} per document, digit NLL ln 10 = 2.303.".format(
        result.get("value_digits", 5))]
    return "\n".join(lines)


__all__ = ["DISTANCES", "EVAL_STREAM", "FILLER_KINDS", "TRAIN_STREAM", "RecallDocument", "distances_for", "filler",
           "make_document", "make_documents", "recall_accuracy", "recall_by_mode", "recall_markdown",
           "score_documents"]
