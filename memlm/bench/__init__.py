"""`memlm bench`: training and generation speed of memlm presets, a dense reference GPT and peer
libraries, measured side by side in one run (see BENCHMARKS.md).

    from memlm.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(presets=["seed-tiny"], peers=False))   # JSON-ready dict
    main(["--presets", "seed-small", "--json"])                           # the CLI
"""

from memlm.bench.config import BenchConfig
from memlm.bench.reference import ReferenceGPT
from memlm.bench.report import markdown, write_results
from memlm.bench.runner import main, run_bench

__all__ = ["BenchConfig", "ReferenceGPT", "main", "markdown", "run_bench", "write_results"]
