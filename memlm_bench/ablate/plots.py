"""One PNG per claim: the validation curves of its arms (bpb against training tokens), the mean
over seeds as a line and the seeds' range as a band (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memlm_bench.ablate.analysis import ClaimResult


def series(result: ClaimResult) -> dict[str, list[list[dict]]]:
    """Label (arm, and sweep point) -> its seeds' validation curves."""
    curves: dict[str, list[list[dict]]] = {}
    for run in result.runs:
        if run.get("error") or not run.get("curve"):
            continue
        point = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in run["point"].items())
        curves.setdefault(run["arm"] + (f" {point}" if point else ""), []).append(run["curve"])
    return curves


def band(curves: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mean, low, high) over seeds, each curve interpolated at every evaluation's tokens
    within the range all curves cover."""
    points = [[(p["tokens"], p["bpb"]) for p in curve if p["bpb"] is not None and np.isfinite(p["bpb"])]
              for curve in curves]
    points = [p for p in points if p]
    end = min(p[-1][0] for p in points)
    grid = np.unique([t for p in points for t, _ in p if t <= end])
    ys = np.stack([np.interp(grid, [t for t, _ in p], [b for _, b in p]) for p in points])  # (seeds, points)
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot_claim(result: ClaimResult, path: str | Path) -> Path | None:
    """The claim's curves, or None when it has none."""
    curves = series(result)
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in curves.items():
        tokens, mean, low, high = band(runs)
        (line,) = ax.plot(tokens, mean, label=f"{name} ({len(runs)} seeds)")
        ax.fill_between(tokens, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bpb")
    ax.set_title(f"claim {result.claim.id}: {result.claim.paper[:70]}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
