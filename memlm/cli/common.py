"""What the command modules share: the user-error class and the run-path argument."""

from __future__ import annotations

from typing import Annotated

import tyro


class UsageError(Exception):
    """A bad command-line value that no config class checks."""


RunPath = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_OR_CKPT")]
