"""`python -m memlm_bench [OPTIONS]` is `memlm bench [OPTIONS]`; `python -m memlm_bench race ...` is
`memlm race ...` (and `race merge FILES...`)."""

import sys

args = sys.argv[1:]
if args[:1] == ["race"]:
    from memlm_bench.race import main

    sys.exit(main(args[1:]))
from memlm_bench import main  # noqa: E402

sys.exit(main(args[1:] if args[:1] == ["bench"] else args))
