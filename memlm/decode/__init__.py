"""Decoding: sampling through the model's forward, and the static (fixed-size) cache step."""

from memlm.decode.generate import filter_logits, generate, sample_next

__all__ = ["generate", "filter_logits", "sample_next"]
