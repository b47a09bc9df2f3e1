"""`python -m memlm.cli ...` (and `torchrun -m memlm.cli ...`) is the `memlm` command."""

import sys

from memlm.cli import main

sys.exit(main())
