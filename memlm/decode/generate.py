"""Autoregressive sampling with the model's state as key/value cache (and memory).

The prompt runs once through the model with a state; every new token then costs one
position of compute. temperature=0 is greedy; top_k and top_p (nucleus, "The Curious Case
of Neural Text Degeneration", arXiv 1904.09751) filter the distribution before sampling.

Decode paths (`decode`): `eager` runs the model's forward with its growing state; `static`
uses memlm.decode.static (a fixed-size key/value cache, the step captured in a CUDA
graph on CUDA); `compiled` is `static` with the step compiled by torch.compile first (worth
its compile time only for long or repeated generation); `auto` takes `static` on CUDA for
models it supports (`auto_static`: memory models too, except slot memories), `eager`
otherwise. A state passed in or asked back (a session continuing its stream) takes the static
path only for models with recurrent memory (memlm.decode.static_memory loads and returns a
State); the plain key/value cache of memlm.decode.static starts from the prompt alone.
"""

from __future__ import annotations

import math

import torch

from memlm.state import State
from memlm.decode import static as static_decode
from memlm.decode import static_memory

DECODE_PATHS = ("auto", "eager", "static", "compiled")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> logits with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the first token always
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    if not temperature >= 0 or math.isinf(temperature):  # NaN fails the comparison
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, state: State | None = None,
             generator: torch.Generator | None = None, return_state: bool = False, decode: str = "auto"):
    """Return prompt + max_new_tokens sampled ids: (B, T + N) for a (B, T) prompt, (T + N,) for (T,).

    `state` continues an earlier stream (its cache/memory precedes the prompt); by default a
    fresh state is made. With return_state=True, also return the state after the last token.
    """
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids[None] if squeeze else prompt_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    path = _decode_path(model, decode, ids, state, return_state)
    if path != "eager":
        return _generate_static(model, ids, max_new_tokens, temperature, top_k, top_p, generator,
                                compile=path == "compiled", squeeze=squeeze, state=state,
                                return_state=return_state)
    was_training = model.training
    model.eval()
    try:
        state = state if state is not None else model.init_state(ids.shape[0], device=ids.device)
        out = model(ids, state=state)
        pieces = [ids]
        for step in range(max_new_tokens):
            next_ids = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)[:, None]  # (B, 1)
            pieces.append(next_ids)
            if step + 1 < max_new_tokens:
                out = model(next_ids, state=out.state)
            else:
                out = model(next_ids, state=out.state) if return_state else out
        result = torch.cat(pieces, dim=1)
    finally:
        model.train(was_training)
    result = result[0] if squeeze else result
    return (result, out.state) if return_state else result


def _decode_path(model, decode: str, ids: torch.Tensor, state: State | None, return_state: bool) -> str:
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    stateful = state is not None or return_state
    recurrent = getattr(getattr(model, "config", None), "recurrent", False)
    if decode == "auto":
        supported = auto_static(model) and (recurrent or not stateful)
        return "static" if ids.is_cuda and supported else "eager"
    if decode != "eager" and stateful and not recurrent:
        raise ValueError(f"decode={decode!r} starts from the prompt alone for a model without recurrent memory: "
                         f"it takes no state and returns none")
    return decode


def auto_static(model) -> bool:
    """Whether `decode="auto"` takes the static path on CUDA for `model`: every model
    memlm.decode.static serves, and the recurrent-memory models memlm.decode.static_memory
    serves, kNN memory included (its graph is captured again at each segment's end; measured in
    BENCHMARKS.md). Slot memories (the registry's mechanisms), whose graph is captured per
    segment too, decode eagerly until their path is measured on a GPU."""
    if not getattr(getattr(model, "config", None), "recurrent", False):
        return static_decode.unsupported_reason(model) is None
    return static_memory.unsupported_reason(model) is None and not getattr(model, "mechanisms", ())


def static_decoder(model, batch_size: int, max_len: int, **options) -> static_decode.StaticDecoder:
    """The static-cache decoder for `model`: over a key/value cache of max_len positions, or, for a
    model with recurrent memory, over its memory buffers for an unbounded stream
    (memlm.decode.static_memory). Raises ValueError for a model neither serves."""
    if getattr(getattr(model, "config", None), "recurrent", False):
        return static_memory.MemoryStaticDecoder(model, batch_size, **options)
    return static_decode.StaticDecoder(model, batch_size, max_len, **options)


@torch.no_grad()
def _generate_static(model, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                     top_p: float | None, generator: torch.Generator | None, *, compile: bool,
                     squeeze: bool, state: State | None = None, return_state: bool = False):
    """The static path of `generate`; state / return_state only for models with recurrent memory
    (`_decode_path` checks): the prompt continues `state`, and the returned State has run the last
    sampled token too, as the eager path's does."""
    was_training = model.training
    model.eval()
    try:
        decoder = static_decoder(model, ids.shape[0], ids.shape[1] + max_new_tokens, compile=compile)
        logits = decoder.prefill(ids, state) if state is not None else decoder.prefill(ids)
        pieces = [ids]
        for step in range(max_new_tokens):
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
            pieces.append(next_ids)
            if step + 1 < max_new_tokens or return_state:
                logits = decoder.step(next_ids)
        result = torch.cat(pieces, dim=1)
        final = decoder.state() if return_state else None
    finally:
        model.train(was_training)
    result = result[0] if squeeze else result
    return (result, final) if return_state else result
