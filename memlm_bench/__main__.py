"""`python -m memlm_bench [OPTIONS]`: the same as `memlm bench`."""

import sys

from memlm_bench import main

sys.exit(main())
