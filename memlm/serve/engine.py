"""Generation for the server: requests of many clients, each from its session's memory, batched.

A new stream starts after an end-of-document token (the model sees the start of a document, as
`memlm generate` does); a session's later requests continue its stream, so their prompts follow
the last completion directly. The State after a request has read the prompt and every token
generated, the last one and any stop string included.

One scheduler thread owns the model. A request's prompt is read alone (its own State, batch 1);
then every decoding step samples each active request's next token with the request's own
generator, and feeds those tokens in as few forwards as the States allow: States at the same
stream position with the same tensors (`State.batch_key`) are stacked into one batch
(`State.cat`), run once and split back (`State.rows`). Rows never mix in a forward, so a
request generates what it would alone, whatever else runs beside it. Requests arriving while
others decode join at the next step; an idle engine waits `gather_ms` after a request for
others to start with it. Limits: States sit at their own stream's position, so
only requests at equal positions share a forward (new streams with prompts of one length,
sessions at the same point); a model with kNN stores (external memory, one object per batch)
decodes each request alone.

Static decoding (`decode="static"`, and `"auto"` on CUDA for the recurrent-memory models
`memlm.generate` decodes that way): requests that start together with prompts of one length
from stackable States (new streams, sessions at one point) become the rows of one
MemoryStaticDecoder taken from a pool (memlm.decode.static_memory; a CUDA graph a step on
CUDA); any other request, and every request of a model with kNN stores (which later rows' writes
would change), gets a decoder of its own. The decoder reads the prompts from the sessions' States
and gives each request its row's State when it ends, equal to the forward's; a finished row is
fed a filler token until its group ends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from memlm.data import ByteTokenizer, Tokenizer
from memlm.decode import sample_next
from memlm.decode import static_memory
from memlm.decode.generate import auto_static
from memlm.decode.streaming import TextStream
from memlm.device import autocast
from memlm.state import State


@dataclass
class Completion:
    """What a finished request produced besides its text."""

    finish_reason: str = "length"
    """"stop" (end of document or a stop string) or "length" (max_tokens reached)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    state: State | None = None
    """The stream's State after the request (for its session)."""


_DONE = object()


@dataclass(eq=False)
class _Job:
    """One request inside the scheduler."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    text: TextStream
    generator: torch.Generator
    result: Completion
    state: State | None
    pieces: queue.Queue = field(default_factory=queue.Queue)
    """What the request's caller reads: text pieces, then _DONE (or an exception)."""
    logits: torch.Tensor | None = None
    """(1, V) the distribution of the next token."""
    group: "_Group | None" = None
    """Static decoding: the decoder whose row `row` the request is (its State lives there until it ends)."""
    row: int = 0
    cancelled: bool = False
    finished: bool = False


def _share_groups(keys: Sequence[object | None], lengths: Sequence[int]) -> list[list[int]]:
    """Indices of the requests that can share a forward (or a decoder): equal key and equal
    number of ids; a None key (kNN stores) is a group of its own."""
    groups: dict[object, list[int]] = defaultdict(list)
    for i, (key, n) in enumerate(zip(keys, lengths)):
        groups[(n, key) if key is not None else ("alone", i)].append(i)
    return list(groups.values())


@dataclass(eq=False)
class _Group:
    """Static decoding: requests decoded as the rows of one decoder, row b being jobs[b]."""

    decoder: static_memory.MemoryStaticDecoder
    jobs: list[_Job]

    def live(self) -> bool:
        return any(not job.finished for job in self.jobs)


class Engine:
    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "auto",
                 tokenizer: Tokenizer | None = None, max_batch: int = 64, gather_ms: float = 2.0,
                 decode: str = "auto"):
        """decode: eager (the forward, requests at one position batched), static (static
        decoders, requests at one position as the rows of one) or auto (static on CUDA where
        memlm.generate would take it, for models with recurrent memory and no knowledge memory;
        else eager)."""
        if decode not in ("auto", "eager", "static"):
            raise ValueError(f"decode must be auto, eager or static, got {decode!r}")
        recurrent = getattr(getattr(model, "config", None), "recurrent", False)
        knowledge = bool(getattr(model, "knowledge", None))
        if decode == "static":
            reason = static_memory.unsupported_reason(model) or (
                "a knowledge memory is read through the forward only" if knowledge else None)
            if reason is not None:
                raise ValueError(f"decode='static' cannot serve this model: {reason}")
        self.static = decode == "static" or (decode == "auto" and device.type == "cuda" and recurrent
                                             and not knowledge and auto_static(model))
        self._decoders: dict[int, list[static_memory.MemoryStaticDecoder]] = defaultdict(list)  # idle, by batch size
        self.model = model.eval()
        self.device, self.precision = device, precision
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()  # the run's (load_tokenizer)
        self.max_batch = max_batch
        self.gather_s = gather_ms / 1000
        """An idle engine that receives a request waits this long for others to start with it."""
        self.forwards = 0
        """Forward calls so far (prompts and decoding steps): fewer than tokens when requests share them."""
        self._incoming: queue.Queue[_Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float | None = None,
                 stop: Sequence[str] = (), seed: int | None = None, state: State | None = None,
                 result: Completion | None = None) -> Iterator[str]:
        """Yield the completion of `prompt` in pieces; fills `result` when done. state: the
        session's State (None: a new stream). Closing the iterator early cancels the request
        (its result.state stays None)."""
        result = result if result is not None else Completion()
        prompt_ids = self.tokenizer.encode(prompt).tolist()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
        job = _Job([*([] if state is not None else [self.tokenizer.eod]), *prompt_ids], max_tokens, temperature,
                   top_p, TextStream(stop, self.tokenizer.eod_text, self.tokenizer), generator, result, state)
        result.prompt_tokens = len(prompt_ids)
        self._submit(job)
        try:
            while (item := job.pieces.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled = True

    # ----- the scheduler thread ------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="memlm-engine", daemon=True)
                self._thread.start()
        self._incoming.put(job)

    def _serve(self) -> None:
        active: list[_Job] = []
        while True:
            new = [] if active else [self._incoming.get()]  # idle: wait for a request...
            if new:
                time.sleep(self.gather_s)  # ...and briefly for others to start with it
            while len(active) + len(new) < self.max_batch:
                try:
                    new.append(self._incoming.get_nowait())
                except queue.Empty:
                    break
            if new:
                self._run(self._prefill, new)
                active += new
            for job in active:
                if job.cancelled and not job.finished:  # its caller went away: give its decoder back
                    job.finished = True
                    self._release(job)
            active = [job for job in active if not job.finished]
            if active:
                self._run(self._step, active)

    def _run(self, work, jobs: list[_Job]) -> None:
        """work(jobs); an error fails those requests (their callers raise it), not the server."""
        try:
            work(jobs)
        except Exception as error:  # noqa: BLE001 - handed to each request's caller
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.pieces.put(error)
                    self._release(job, reuse=False)  # its decoder may be mid-step: not reused

    def _prefill(self, jobs: list[_Job]) -> None:
        """Read the new requests' prompts, those of one length from equal States in one forward."""
        if self.static:
            self._prefill_static(jobs)
            return
        for job in jobs:
            job.state = job.state if job.state is not None else self.model.init_state(1, device=self.device)
        self._feed(jobs, [job.ids for job in jobs])

    def _step(self, jobs: list[_Job]) -> None:
        """One token for every job: sample, feed it (batched by State), then stop or go on."""
        tokens = [int(sample_next(job.logits, job.temperature, None, job.top_p, job.generator)) for job in jobs]
        if self.static:
            self._step_static(jobs, tokens)
        else:
            self._feed(jobs, [[token] for token in tokens])
        for job, token in zip(jobs, tokens):
            self._after(job, token)

    def _prefill_static(self, jobs: list[_Job]) -> None:
        """Static decoding: the new requests' prompts, grouped as `_feed` groups them (equal lengths,
        stackable States) except with kNN stores, each group into a decoder of its batch size."""
        stores = bool(self.model.config.memory.knn.layers)
        keys = [None if stores else job.state.batch_key() if job.state is not None else "new stream" for job in jobs]
        for group_rows in _share_groups(keys, [len(job.ids) for job in jobs]):
            members = [jobs[i] for i in group_rows]
            B = len(members)
            pool = self._decoders[B]
            decoder = pool.pop() if pool else static_memory.MemoryStaticDecoder(self.model, batch_size=B)
            ids = torch.tensor([job.ids for job in members], device=self.device)  # (B, T)
            states = [job.state for job in members]
            state = None if states[0] is None else states[0] if B == 1 else State.cat(states)
            with autocast(self.device, self.precision):
                logits = decoder.prefill(ids, state).float()  # (B, V)
            group = _Group(decoder, members)
            for b, job in enumerate(members):
                job.group, job.row, job.logits, job.state = group, b, logits[b:b + 1].clone(), None
            self.forwards += 1

    def _step_static(self, jobs: list[_Job], tokens: list[int]) -> None:
        """Static decoding: one step of every group with a request in `jobs`; rows whose request
        ended read a filler token (the end-of-document id), their output unused."""
        by_group: dict[_Group, dict[int, int]] = defaultdict(dict)
        for job, token in zip(jobs, tokens):
            by_group[job.group][job.row] = token
        for group, rows in by_group.items():
            ids = [[rows.get(b, self.tokenizer.eod)] for b in range(len(group.jobs))]
            with autocast(self.device, self.precision):  # the step's output is overwritten by its next replay
                logits = group.decoder.step(torch.tensor(ids, device=self.device)).float()  # (B, V)
            for b in rows:
                group.jobs[b].logits = logits[b:b + 1].clone()
            self.forwards += 1

    def _feed(self, jobs: list[_Job], ids: list[list[int]]) -> None:
        """Each job's State reads its ids: jobs with ids of one length and stackable States
        (`State.batch_key`) share one forward."""
        for members in _share_groups([job.state.batch_key() for job in jobs], [len(i) for i in ids]):
            batch = torch.tensor([ids[i] for i in members], device=self.device)  # (B, T)
            if len(members) == 1:
                job = jobs[members[0]]
                job.logits, job.state = self._forward(batch, job.state)
                continue
            logits, state = self._forward(batch, State.cat([jobs[i].state for i in members]))
            for b, (i, row) in enumerate(zip(members, state.rows())):
                jobs[i].logits, jobs[i].state = logits[b:b + 1], row

    def _after(self, job: _Job, token: int) -> None:
        """The sampled token has been read: emit its text, or finish the request."""
        job.result.completion_tokens += 1
        stopped = token == self.tokenizer.eod
        if not stopped:
            piece = job.text.feed([token])
            if piece:
                job.pieces.put(piece)
            stopped = job.text.stopped
        if stopped or job.result.completion_tokens >= job.max_tokens:
            job.result.finish_reason = "stop" if stopped else "length"
            piece = job.text.finish()
            if piece:
                job.pieces.put(piece)
            job.result.state = self._row_state(job) if job.group is not None else job.state
            job.finished = True
            self._release(job)
            job.pieces.put(_DONE)

    @staticmethod
    def _row_state(job: _Job) -> State:
        """Static decoding: the State of the request's row after its last token."""
        state = job.group.decoder.state()
        return state if len(job.group.jobs) == 1 else state.rows()[job.row]

    def _release(self, job: _Job, reuse: bool = True) -> None:
        """A request has ended: once every row of its group has, the group's decoder goes back to
        the pool (or, after an error, is dropped)."""
        group, job.group = job.group, None
        if group is not None and not group.live() and group.decoder is not None:
            if reuse:
                self._decoders[len(group.jobs)].append(group.decoder)
            group.decoder = None

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Logits (B, V) after ids (B, T), and the state that has read them."""
        self.forwards += 1
        with autocast(self.device, self.precision):
            out = self.model(ids, state=state)
        return out.logits[:, -1].float(), out.state
