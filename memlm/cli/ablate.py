"""`memlm ablate`: the reading list's claims tested side by side (memlm_bench.ablate), imported
only here, inside the command, as bench and race are (memlm.cli.harness)."""

from __future__ import annotations


def run(argv: list[str]) -> int:
    from memlm_bench.ablate.cli import main
    return main(argv)
