"""Training and validation curves of a run as a PNG (matplotlib's Agg canvas, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training bpb (per logged step) and validation bpb against steps, with the test bpb if any."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib loads only when a run ends
    from matplotlib.figure import Figure

    train = [(r["step"], r["bpb"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["bpb"]) for r in records if r["kind"] == "eval"]
    test = [r for r in records if r["kind"] == "test"]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    if test:
        ax.axhline(test[-1]["bpb"], ls="--", color="gray", label=f"test {test[-1]['bpb']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
