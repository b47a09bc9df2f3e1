"""`memlm bench`: training and generation speed of memlm presets, a dense reference GPT and peer
libraries, measured side by side in one run (see BENCHMARKS.md).

    from memlm_bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(presets=["seed-tiny"], peers=False))   # JSON-ready dict
    main(["--presets", "seed-small", "--json"])                           # the CLI
"""

from memlm_bench.config import BenchConfig
from memlm_bench.reference import ReferenceGPT
from memlm_bench.report import markdown, write_results
from memlm_bench.runner import main, run_bench

__all__ = ["BenchConfig", "ReferenceGPT", "main", "markdown", "run_bench", "write_results"]
