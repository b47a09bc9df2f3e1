"""`memlm bench` and `memlm race`: the benchmark harness, a package of its own (memlm_bench) that
memlm imports only here, inside the commands, so that nothing else of memlm depends on it."""

from __future__ import annotations


def bench(argv: list[str]) -> int:
    from memlm_bench import main
    return main(argv)


def race(argv: list[str]) -> int:
    from memlm_bench.race import main
    return main(argv)
