"""Generation for the server: one request's text, piece by piece, from a session's memory.

A new stream starts after an end-of-document token (the model sees the start of a document, as
`memlm generate` does); a session's later requests continue its stream, so their prompts follow
the last completion directly. The State after a request has read the prompt and every token
generated, the last one and any stop string included. Requests run one at a time (`lock`): the
model and its states are not shared between threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from memlm.data import ByteTokenizer, Tokenizer
from memlm.decode import sample_next
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


class Engine:
    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "auto",
                 tokenizer: Tokenizer | None = None):
        self.model = model.eval()
        self.device, self.precision = device, precision
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()  # the run's (load_tokenizer)
        self.lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int, temperature: float = 1.0, top_p: float | None = None,
                 stop: Sequence[str] = (), seed: int | None = None, state: State | None = None,
                 result: Completion | None = None) -> Iterator[str]:
        """Yield the completion of `prompt` in pieces; fills `result` when done. state: the
        session's State (None: a new stream)."""
        result = result if result is not None else Completion()
        prompt_ids = self.tokenizer.encode(prompt).tolist()
        eod = self.tokenizer.eod
        ids = prompt_ids if state is not None else [eod] + prompt_ids
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()))
        text = TextStream(stop, self.tokenizer.eod_text, self.tokenizer)
        with self.lock:  # held across yields: resumed pieces may run on other threads
            state = state if state is not None else self.model.init_state(1, device=self.device)
            logits, state = self._forward(ids, state)
            result.prompt_tokens = len(prompt_ids)
            for step in range(max_tokens):
                token = sample_next(logits, temperature, None, top_p, generator)  # (1,)
                logits, state = self._forward([int(token)], state)  # the state reads every generated token
                result.completion_tokens = step + 1
                value = int(token)
                if value == eod:
                    result.finish_reason = "stop"
                    break
                piece = text.feed([value])
                if piece:
                    yield piece
                if text.stopped:
                    result.finish_reason = "stop"
                    break
            piece = text.finish()
            if piece:
                yield piece
            result.state = state

    @torch.no_grad()
    def _forward(self, ids: list[int], state: State) -> tuple[torch.Tensor, State]:
        """Logits (1, V) after ids, and the state that has read them. Autocast and grad mode are
        per thread, so they are entered here, around each call, not across the caller's yields."""
        with autocast(self.device, self.precision):
            out = self.model(torch.tensor([ids], device=self.device), state=state)
        return out.logits[:, -1].float(), out.state
