"""The Pareto plot: perplexity and KL divergence against bits per weight, front highlighted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lowbit.compare.writers import finished

TITLES = {"perplexity": "perplexity (log scale)", "kl": "KL to the original, nats/token (log scale)"}


class PlotUnavailable(RuntimeError):
    """matplotlib is missing; the message says how to install it."""


def plot_pareto(rows: list[dict[str, Any]], original: dict[str, Any], path: Path, title: str) -> None:
    """Two panels sharing the x axis; every finished cell a labelled point, one colour per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("the plot needs matplotlib: pip install matplotlib") from None
    done = [row for row in rows if finished(row)]
    methods = sorted({row["method"] for row in done})
    colours = {method: plt.get_cmap("tab10")(i % 10) for i, method in enumerate(methods)}
    figure, axes = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    for axis, metric in zip(axes, ("perplexity", "kl")):
        points = [row for row in done if _positive(row[metric])]
        for method in methods:
            mine = [row for row in points if row["method"] == method]
            axis.scatter([r["bits_per_weight"] for r in mine], [r[metric] for r in mine], s=40,
                         color=colours[method], label=method, zorder=3)
        front = sorted((row for row in points if row.get(f"pareto_{metric}")), key=lambda r: r["bits_per_weight"])
        if front:
            axis.step([r["bits_per_weight"] for r in front], [r[metric] for r in front], where="post",
                      color="black", linewidth=1.2, zorder=2, label="Pareto front")
            axis.scatter([r["bits_per_weight"] for r in front], [r[metric] for r in front], s=140,
                         facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)
        for row in points:
            axis.annotate(row["label"], (row["bits_per_weight"], row[metric]),
                          textcoords="offset points", xytext=(5, 4), fontsize=7,
                          fontweight="bold" if row.get(f"pareto_{metric}") else "normal")
        if metric == "perplexity" and _positive(original.get("perplexity")):
            axis.axhline(original["perplexity"], color="grey", linestyle="--", linewidth=1,
                         label=f"original ({original['perplexity']:.2f})")
        if points:
            axis.set_yscale("log")
        axis.set_xlabel("bits per weight (quantized linears, scales and zero points included)")
        axis.set_ylabel(TITLES[metric])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
