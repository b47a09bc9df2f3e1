"""Decoding: sampling through the model's forward, streaming, and the static (fixed-size) cache steps."""

from memlm.decode.generate import filter_logits, generate, sample_next, static_decoder
from memlm.decode.streaming import TextStream, stream

__all__ = ["generate", "filter_logits", "sample_next", "static_decoder", "stream", "TextStream"]
