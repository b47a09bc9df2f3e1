"""Byte-level tokenizer: ids 0-255 are the bytes of the UTF-8 text, 256 ends a document.

Any text or code encodes with no vocabulary file and no unknown tokens. Decoding never
fails: invalid UTF-8 becomes U+FFFD, `EOD` becomes `eod_text` (default ``"<|eod|>"``, a
visible marker so samples show where the model ended a document) and ids outside the
vocabulary become U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

EOD = 256
"""Id of the end-of-document token, appended after every document."""
VOCAB_SIZE = 257
"""256 byte ids plus `EOD`."""
EOD_TEXT = "<|eod|>"
"""Default text that `ByteTokenizer.decode` shows for `EOD`."""
REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """Text <-> byte ids. `eod_text` is what `decode` writes for an `EOD` id."""

    kind = "byte"
    spec = "bytes"
    vocab_size = VOCAB_SIZE
    eod = EOD

    def __init__(self, eod_text: str = EOD_TEXT):
        self.eod_text = eod_text

    def encode(self, text: str | bytes | memoryview, *, eod: bool = False, dtype=np.int64) -> np.ndarray:
        """UTF-8 bytes of `text` as ids, shape (n,) (+1 with `eod`). int64 feeds torch directly."""
        data = text.encode("utf-8") if isinstance(text, str) else text  # bytes-like: no copy
        ids = np.frombuffer(data, np.uint8).astype(dtype)
        return np.append(ids, np.array([EOD], dtype)) if eod else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a 1-D id sequence (list, numpy array or tensor); never raises on bad ids."""
        if hasattr(ids, "tolist"):  # numpy array or torch tensor, any device
            ids = ids.tolist()
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(self.eod_text if i == EOD else REPLACEMENT)
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_bytes(self, token: int) -> bytes:
        """The byte id `token` stands for (b"" for `EOD` and ids outside the vocabulary)."""
        return bytes([token]) if 0 <= token < 256 else b""

    def byte_lengths(self) -> np.ndarray:
        """(257,) ones: every id, `EOD` included, counts as one byte in bits per byte."""
        return np.ones(VOCAB_SIZE, np.int64)

    def describe(self) -> dict:
        """The manifest's description (unchanged since the first cache format)."""
        return {"kind": "byte", "vocab_size": VOCAB_SIZE, "eod": EOD, "dtype": "uint16"}
