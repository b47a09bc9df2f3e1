"""The PNGs of a run (matplotlib's Agg canvas, no display): training and validation curves,
learned adaptive spans by layer and head, test bpb by position within the document."""

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


def plot_spans(spans: list[list[float]], path: str | Path, span_max: int | None = None, title: str = "") -> None:
    """Learned adaptive spans (positions) as a layer x head heatmap, each cell labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, heads = len(spans), len(spans[0]) if spans else 0
    fig = Figure(figsize=(max(4.0, 0.9 * heads + 2.5), max(3.0, 0.5 * layers + 1.8)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(spans, aspect="auto", cmap="viridis", vmin=0, vmax=span_max, origin="lower")
    fig.colorbar(image, ax=ax, label="span (positions)")
    high = span_max if span_max is not None else max((v for row in spans for v in row), default=0)
    for layer, row in enumerate(spans):
        for head, value in enumerate(row):
            ax.text(head, layer, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if high and value > 0.6 * high else "white")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "learned attention spans")
    fig.tight_layout()
    fig.savefig(path)


def plot_by_position(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """bpb by position within the document (the `by_position` buckets of memlm.eval.evaluate):
    one bar per bucket that holds tokens, labelled with its token count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [r for r in rows if r.get("bpb") is not None]
    labels = [f"{r['from']:,}-{r['to']:,}" if r["to"] is not None else f"{r['from']:,}+" for r in scored]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(scored)), [r["bpb"] for r in scored], color="tab:blue")
    for bar, r in zip(bars, scored):
        ax.annotate(f"{r['bpb']:.3f}\n{r['tokens']:,} tok", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(scored)), labels)
    ax.set_xlabel("position in document (bytes)")
    ax.set_ylabel("test bits per byte")
    ax.set_title(title or "test bpb by position in document")
    if scored:
        ax.set_ylim(0, 1.18 * max(r["bpb"] for r in scored))  # room for the labels
    else:
        ax.text(0.5, 0.5, "no scored tokens", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
