"""From run JSONs to each claim's findings: per comparison, the arms' values by seed, the paired
differences, their interval and verdict (memlm_bench.ablate.stats), and how the runs were held equal.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm_bench.ablate.claims import Claim, Comparison
from memlm_bench.ablate.measures import seed_values
from memlm_bench.ablate.stats import NOT_RUN, Summary, paired, summarise


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """Every finished run's record under <out>/runs (failed runs included: they carry their error)."""
    records = []
    for path in sorted(Path(out, "runs").glob("*/*/*.json")):  # runs/<claim>/<arm>/<seed>.json
        if path.name.endswith(".spec.json"):  # what a child process was given
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "claim" in record and "metrics" in record:
            records.append(record)
    return records


@dataclass
class Finding:
    comparison: Comparison
    values: dict[str, dict[int, float]]
    """arm -> seed -> value (paired seeds only)."""
    differences: list[float]
    summary: Summary


@dataclass
class ClaimResult:
    claim: Claim
    runs: list[dict[str, Any]]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return any(not run.get("error") for run in self.runs)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if run.get("error")]

    @property
    def incomplete(self) -> list[dict[str, Any]]:
        """Runs that trained but a measure of which failed."""
        return [run for run in self.runs if not run.get("error") and run.get("measure_errors")]

    @property
    def budget(self) -> dict[str, Any] | None:
        """The budget the runs were held to (the first run's; all runs of a claim share it)."""
        return self.runs[0]["budget"] if self.runs else None


def by_seed(runs: list[dict[str, Any]]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """seed -> arm -> that arm's successful runs (one per sweep point)."""
    grouped: dict[int, dict[str, list[dict]]] = {}
    for run in runs:
        if not run.get("error"):
            grouped.setdefault(run["seed"], {}).setdefault(run["arm"], []).append(run)
    return grouped


def analyse(claim: Claim, runs: list[dict[str, Any]]) -> ClaimResult:
    """The findings of one claim from its runs."""
    result = ClaimResult(claim, [run for run in runs if run["claim"] == claim.id])
    seeds = by_seed(result.runs)
    points = max(1, len(claim.sweep))
    for comparison in claim.comparisons:
        arms = [comparison.treatment] + ([comparison.baseline] if comparison.baseline else [])
        values: dict[str, dict[int, float]] = {arm: {} for arm in arms}
        for seed, by_arm in sorted(seeds.items()):
            complete = {arm: rs for arm, rs in by_arm.items() if len(rs) == points}
            if comparison.metric == "tokens_to_target" and len(complete) < len(claim.arms):
                continue  # the target is the worst arm's best: every arm of the seed is needed
            per_arm = seed_values(comparison.metric, complete)
            if all(per_arm.get(arm) is not None for arm in arms):
                for arm in arms:
                    values[arm][seed] = per_arm[arm]
        paired_seeds = sorted(values[comparison.treatment])
        differences = paired([values[comparison.treatment][s] for s in paired_seeds],
                             [values[comparison.baseline][s] for s in paired_seeds] if comparison.baseline else None)
        result.findings.append(Finding(comparison, values, differences,
                                       summarise(differences, comparison.direction)))
    return result


def arm_mean(values: dict[int, float]) -> tuple[float | None, float | None]:
    """(mean, standard deviation over seeds) of one arm's values; sd None for one seed."""
    xs = list(values.values())
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def overall(results: list[ClaimResult]) -> dict[str, int]:
    """How many comparisons ended in each verdict."""
    counts: dict[str, int] = {}
    for result in results:
        for finding in result.findings:
            counts[finding.summary.verdict] = counts.get(finding.summary.verdict, 0) + 1
    return counts or {NOT_RUN: 0}
