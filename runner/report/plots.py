"""Pictures the report shows that no other stage draws: the served latency histogram and, for evaluate reports without
their own PNG, a confusion matrix. matplotlib's object API with the Agg canvas: no pyplot global state, no display."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def latency_histogram(samples_ms: list[float], p50: float, p95: float, path: Path, title: str = "") -> None:
    """One bar per latency bucket, with the p50 and p95 the report quotes drawn as lines (so the picture and the numbers
    can be checked against each other)."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(8, 3.6)
    axes = figure.subplots()
    axes.hist(samples_ms, bins=min(30, max(5, len(samples_ms) // 3)), color="#6b8fd6", edgecolor="white")
    for value, name, colour in ((p50, "p50", "#137333"), (p95, "p95", "#b3261e")):
        axes.axvline(value, color=colour, linestyle="--", linewidth=1.5, label=f"{name} {value:.1f} ms")
    axes.set(xlabel="latency per request (ms)", ylabel="requests",
             title=title or f"served latency, {len(samples_ms)} sequential requests")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # requests are counted, not measured
    axes.grid(alpha=0.3, axis="y")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    """Counts with rows = true label and columns = predicted label, each cell written out."""
    size = max(3.5, 0.9 * len(labels) + 2)
    figure = _figure(size, size * 0.85)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    peak = max((max(row) for row in matrix if row), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "#1d2330")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
