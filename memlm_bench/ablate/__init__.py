"""memlm_bench.ablate: `memlm ablate`, the reading list's claims tested side by side.

Each claim of the reading list (claims.CLAIMS: T5 bias, multi-query attention, memory by depth,
adaptive span, compressive memory, persistent memory, kNN memory, feedback, memory tokens, no bias,
ScaleNorm, forgetful causal masking, QK-norm, squared ReLU and GLU, RoPE, xPos, TUPE) is a set of
arms (memlm presets with dotted overrides) trained by memlm's Trainer for the same budget, several
seeds each, paired by seed; stats gives each comparison's paired difference, 95% t interval and
verdict; RESULTS.md and a plot per claim report them.

    claims.py     the registry: Claim, Arm, Comparison, CLAIMS, arm_config
    config.py     the command's options, budgets, the plan of runs (RunSpec)
    run.py        one run: train, score, write its JSON (also `python -m memlm_bench.ablate.run SPEC`)
    measures.py   derived metrics (longer windows, another corpus, decoding speed, spans, divergence)
    pool.py       runs in this process, or in child processes over devices (--concurrent, --devices)
    stats.py      t quantiles, paired differences, intervals, verdicts
    analysis.py   run JSONs -> each claim's findings
    results_md.py RESULTS.md;  plots.py: a PNG per claim;  cli.py: `memlm ablate`
"""

from memlm_bench.ablate.claims import CLAIMS, Arm, Claim, Comparison, arm_config
from memlm_bench.ablate.cli import main
from memlm_bench.ablate.stats import summarise, t_quantile

__all__ = ["CLAIMS", "Arm", "Claim", "Comparison", "arm_config", "main", "summarise", "t_quantile"]
