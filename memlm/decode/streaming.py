"""Streaming generation: token ids one at a time, stop tokens, and text with stop strings.

`stream` yields the sampled ids of one stream as they are decoded (through the model's forward
with its state, or the static decoders of memlm.decode.static / static_memory), so a caller can
show text while it is written and stop early; with the same generator it samples what
`memlm.generate` samples. `TextStream` turns ids into text pieces through the bytes each id
stands for (bytes, or a tokenizer's `token_bytes`, memlm.data.tokenizers): it holds back an
incomplete UTF-8 character and any ending that could still become a stop string, and
ends the text before the first stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence

import torch

from memlm.decode.generate import _decode_path, sample_next, static_decoder
from memlm.state import State


@torch.no_grad()
def stream(model, prompt_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, state: State | None = None,
           generator: torch.Generator | None = None, stop_ids: Iterable[int] = (),
           decode: str = "auto") -> Iterator[int]:
    """Yield up to max_new_tokens ids sampled after prompt_ids (T,), one per decoded position.

    A sampled id in `stop_ids` (e.g. the end-of-document id) ends the stream and is not yielded.
    `state` continues an earlier stream (eager decoding only, as in `memlm.generate`)."""
    if prompt_ids.dim() != 1 or prompt_ids.shape[0] == 0:
        raise ValueError(f"stream decodes one stream: prompt_ids must be (T,) with T >= 1, got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = prompt_ids[None]  # (1, T)
    stops = set(int(i) for i in stop_ids)
    path = _decode_path(model, decode, ids, state, False)
    was_training = model.training
    model.eval()
    try:
        if path == "eager":
            out = model(ids, state=state if state is not None else model.init_state(1, device=ids.device))
            logits, state = out.logits[:, -1], out.state

            def advance(token: torch.Tensor) -> torch.Tensor:
                nonlocal state
                out = model(token, state=state)
                state = out.state
                return out.logits[:, -1]
        else:
            decoder = static_decoder(model, 1, ids.shape[1] + max_new_tokens, compile=path == "compiled")
            logits = decoder.prefill(ids)
            advance = decoder.step
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)[:, None]  # (1, 1)
            value = int(token)
            if value in stops:
                return
            yield value
            if step + 1 < max_new_tokens:
                logits = advance(token)
    finally:
        model.train(was_training)


class TextStream:
    """Token ids -> text pieces, ending before the first of `stop_strings`.

    feed(ids) returns the text that is final so far (possibly ""); `stopped` turns True once a
    stop string was seen, after which everything is ignored; finish() returns what was held back.
    tokenizer: anything with `eod` and `token_bytes(id)` (memlm.data.tokenizers); None = bytes,
    whose ids >= 256 (end of document) are written as `eod_text`, as the tokenizer's `eod` is."""

    def __init__(self, stop_strings: Sequence[str] = (), eod_text: str = "<|eod|>", tokenizer=None):
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must not be empty")
        self.stop_strings = tuple(stop_strings)
        self.eod_text = eod_text
        self._is_eod = (lambda i: i >= 256) if tokenizer is None else (lambda i: i == tokenizer.eod)
        self._bytes = (lambda i: bytes([i])) if tokenizer is None else tokenizer.token_bytes
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released: it may begin a stop string

    def feed(self, ids: Iterable[int]) -> str:
        if self.stopped:
            return ""
        for i in ids:
            if self._is_eod(i):
                self._held += self._decoder.decode(b"", final=True) + self.eod_text
            else:
                self._held += self._decoder.decode(self._bytes(i))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cuts = [self._held.find(s) for s in self.stop_strings]
        cuts = [c for c in cuts if c >= 0]
        if cuts:
            self.stopped = True
            text, self._held = self._held[:min(cuts)], ""
            return text
        keep = 0 if final else self._partial_stop_length()
        text, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return text

    def _partial_stop_length(self) -> int:
        """Length of the longest ending of the held text that begins some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
