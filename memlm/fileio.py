"""Small file helpers shared by checkpoints and stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's) contents to disk, so a rename after it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Have `fill(tmp)` write a directory's contents into a temporary sibling, flush it, then
    rename it to `directory`, replacing what was there only once the new copy is complete.
    A crash leaves either the old directory or the new one (at worst the old one under
    `.NAME.old-*` beside it); a failure inside `fill` leaves the old one untouched."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = directory.with_name(f".{directory.name}.tmp-{tag}"), directory.with_name(f".{directory.name}.old-{tag}")
    moved = False
    try:
        tmp.mkdir()
        fill(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
        fsync_path(tmp)
        if directory.exists():
            os.rename(directory, old)
            moved = True
        os.rename(tmp, directory)
        fsync_path(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not directory.exists():
            os.rename(old, directory)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    return directory
