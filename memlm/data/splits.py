"""Deterministic document-level train/validation/test split.

A document's split depends only on the SHA-1 of its name (relative path) and the split
fractions, never on listing order or on the other documents, so adding a file never moves
another file between splits.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from .errors import DataError

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.98, 0.01, 0.01)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, validation, test) fractions: three numbers >= 0 summing to 1."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise DataError(f"split fractions must be three numbers, got {fractions!r}") from None
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise DataError(f"split fractions must be three numbers >= 0 (train, validation, test), got {fractions!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise DataError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def assign_split(name: str, fractions: Sequence[float]) -> str:
    """The split of document `name`: its SHA-1 read as a number u in [0, 1) against the cumulative fractions."""
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    train, validation, _ = fractions
    if u < train:
        return "train"
    if u < train + validation:
        return "validation"
    return "test"
