"""An exclusive lock on a run directory, so two trainings never write one run.

The lock is an advisory `flock` on `<run>/.lock`, which also holds the holder's PID for the
message. The kernel releases it when the holding process ends, however it ends (kill -9
included), so a lock left by a dead process never blocks a new run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK = ".lock"


class RunDirectoryBusy(Exception):
    """Another process holds the run directory (a one-line message for the user)."""


class RunLock:
    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK
        self.file = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirectoryBusy naming the holder's PID."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise RunDirectoryBusy(f"{self.path.parent} is in use by another training (PID {holder}); wait for it "
                                   f"to end or choose another --out") from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
