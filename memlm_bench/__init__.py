"""memlm_bench: the benchmark harness beside memlm, built on memlm's public API. `memlm bench`
times memlm presets, a dense reference GPT and peer libraries side by side (speed); `memlm race`
trains contenders for one budget with memlm's Trainer and scores them on test bpb (quality).
memlm imports it only inside those two commands; see BENCHMARKS.md.

    from memlm_bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(presets=["seed-tiny"], peers=False))   # JSON-ready dict
    main(["--presets", "seed-small", "--json"])                           # `memlm bench`
    python -m memlm_bench [race] OPTIONS                                  # `memlm bench` / `memlm race`
"""

from memlm_bench.config import BenchConfig
from memlm_bench.reference import ReferenceGPT
from memlm_bench.report import bench_markdown, write_bench_results
from memlm_bench.runner import main, run_bench

__all__ = ["BenchConfig", "ReferenceGPT", "bench_markdown", "main", "run_bench", "write_bench_results"]
