"""Decoding: sampling through the model's forward, and the static (fixed-size) cache steps."""

from memlm.decode.generate import filter_logits, generate, sample_next, static_decoder

__all__ = ["generate", "filter_logits", "sample_next", "static_decoder"]
