"""`python -m memlm.bench [OPTIONS]`: the same as `memlm bench`."""

import sys

from memlm.bench import main

sys.exit(main())
