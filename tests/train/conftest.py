"""Fixtures of the trainer tests: the corpus cache in tmp_path, a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import write_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")
