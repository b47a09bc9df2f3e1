"""RESULTS.md: one row per claim (the claim, its paper, the setup, the arms' numbers, the paired
difference with its 95% interval, the verdict and the command that reproduces it). Claims without
runs are rows too, "not run", with their command. Every number comes from run JSONs."""

from __future__ import annotations

import math
from typing import Any

from memlm.tables import markdown_table
from memlm_bench.ablate.analysis import ClaimResult, arm_mean, overall
from memlm_bench.ablate.stats import LEVEL, MIN_SEEDS, NOT_RUN

COLUMNS = ["#", "claim", "paper", "setup", "arms (mean ± sd over seeds)", "difference [95% CI] (n seeds)",
           "verdict", "reproduce"]
BREAK = "<br>"


def number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def budget_text(budget: dict[str, Any] | None, claim_budget: str) -> str:
    """How the runs were held equal, in words."""
    if budget is None:
        return f"equal {claim_budget}"
    if "tokens_per_s" in budget:
        return (f"equal wall-clock ({budget['minutes']:g} min per run), converted to tokens by each arm's "
                f"throughput measured alone, since the arms shared a device (concurrent runs)")
    if "steps" in budget:
        text = f"equal tokens ({budget['steps']:,} steps per run)"
    elif "tokens" in budget:
        text = f"equal tokens ({budget['tokens']:,} per run)"
    else:
        text = f"equal wall-clock ({budget['minutes']:g} min per run)"
    if budget.get("shared"):
        text += "; the arms shared a device (concurrent runs), so they are compared at equal tokens"
    elif budget["kind"] != claim_budget:
        text += f" (the claim asks for equal {claim_budget})"
    return text


def setup_cell(result: ClaimResult) -> str:
    c, runs = result.claim, result.runs
    parts = [c.setup, budget_text(result.budget, c.budget)]
    if runs:
        first = runs[0]
        parts.append(f"{first['preset'].rsplit('-', 1)[-1]} shape, data `{first['train']['data']}`, "
                     f"{first['meta']['device']}")
    if c.needs:
        parts.append(f"gap: {c.needs}")
    if result.failed:
        parts.append(f"{len(result.failed)} run(s) failed, e.g. {result.failed[0]['arm']} seed "
                     f"{result.failed[0]['seed']}: {result.failed[0]['error'][:160]}")
    if result.incomplete:
        name, error = next(iter(result.incomplete[0]["measure_errors"].items()))
        parts.append(f"{len(result.incomplete)} run(s) lack {name}: {error[:160]}")
    return BREAK.join(parts)


def arms_cell(result: ClaimResult) -> str:
    """Each arm's mean ± sd of every metric its comparisons use (over the paired seeds)."""
    lines = []
    for arm in result.claim.arms:
        shown = []
        for finding in result.findings:
            if arm.name in finding.values and finding.values[arm.name]:
                mean, sd = arm_mean(finding.values[arm.name])
                entry = f"{finding.comparison.metric} {number(mean)}" + (f" ± {number(sd)}" if sd is not None else "")
                if entry not in shown:
                    shown.append(entry)
        if shown:
            lines.append(f"{arm.name}: {', '.join(shown)}")
    return BREAK.join(lines) or "—"


def difference_cell(result: ClaimResult) -> str:
    lines = []
    for finding in result.findings:
        c, s = finding.comparison, finding.summary
        what = f"{c.treatment} − {c.baseline}" if c.baseline else c.treatment
        if s.mean is None:
            value = "—"
        elif s.low is None:
            value = f"{number(s.mean)} (no interval)"
        else:
            value = f"{number(s.mean)} [{number(s.low)}, {number(s.high)}]"
        lines.append(f"{c.metric}, {what} (claimed {c.direction}): {value} (n={s.n})")
    return BREAK.join(lines)


def verdict_cell(result: ClaimResult) -> str:
    if not result.ran:
        return NOT_RUN
    return BREAK.join(f"{f.comparison.metric}: **{f.summary.verdict}**" for f in result.findings)


def row(result: ClaimResult, command: str, plot: str | None) -> list[str]:
    c = result.claim
    claim_text = c.claim + (f" ([plot]({plot}))" if plot else "")
    return [c.id, claim_text, f"{c.paper} (arXiv {c.arxiv})", setup_cell(result),
            arms_cell(result) if result.ran else "—", difference_cell(result) if result.ran else "—",
            verdict_cell(result), f"`{command}`"]


def results_markdown(results: list[ClaimResult], commands: dict[str, str], plots: dict[str, str]) -> str:
    """The whole RESULTS.md."""
    counts = overall(results)
    ran = sum(result.ran for result in results)
    lines = [
        "# Ablations: the reading list's claims, tested side by side", "",
        "Written by `memlm ablate` (memlm_bench/ablate) from the run JSONs of its output directory; every "
        "number below comes from those runs. Regenerate with `memlm ablate --report-only --out DIR`.", "",
        f"- Each claim's arms train with the same settings for each seed; seed k gives every arm the same data "
        f"order (paired). Per seed the difference treatment − baseline; its mean and {LEVEL:.0%} confidence "
        f"interval use Student's t with n − 1 degrees of freedom.",
        f"- Verdicts: **confirmed** where the interval excludes zero in the claimed direction, **refuted** where it "
        f"excludes zero the other way, **inconclusive** where it holds zero; **too few seeds** with fewer than "
        f"{MIN_SEEDS} paired seeds (no interval drawn); **not run** for claims without runs.",
        "- Budgets: equal wall-clock claims train each run for the same minutes on a device of its own; claims "
        "at equal tokens (and every claim whose runs shared a device) train on the same number of tokens.",
        "- A gap names what memlm lacks to test a claim as its paper did: the verdict covers the setup as run.",
        "",
        f"Claims run: {ran} of {len(results)}; comparisons: "
        + ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items())) + ".", "",
    ]
    lines += markdown_table(COLUMNS, [row(r, commands[r.claim.id], plots.get(r.claim.id)) for r in results])
    return "\n".join(lines) + "\n"
