"""`python -m memlm_bench.ablate [OPTIONS]` is `memlm ablate [OPTIONS]`."""

import sys

from memlm_bench.ablate.cli import main

sys.exit(main())
