"""Writes every output of a comparison into its folder: JSON, CSV, Markdown, PNG plot and HTML report."""

from __future__ import annotations

from pathlib import Path

from lowbit.compare.html import write_html
from lowbit.compare.plot import PlotUnavailable, plot_pareto
from lowbit.compare.runner import CompareResult
from lowbit.compare.writers import mark_fronts, write_csv, write_json, write_markdown

FILES = {"json": "results.json", "csv": "results.csv", "md": "results.md", "png": "pareto.png",
         "html": "report.html"}


def write_outputs(result: CompareResult, out_dir: Path) -> dict[str, Path]:
    """Write every output; the plot is skipped (with a note in the report) without matplotlib."""
    rows = mark_fronts(result)
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    title = f"lowbit compare: {result.meta['model']}"
    try:
        plot_pareto(rows, result.original, paths["png"], title)
    except PlotUnavailable as err:
        result.meta.setdefault("notes", []).append(f"plot skipped: {err}")
        paths.pop("png")
    write_json(result, rows, paths["json"])
    write_csv(result, rows, paths["csv"])
    write_markdown(result, rows, paths["md"])
    write_html(result.meta, result.original, rows, paths.get("png"), paths["html"], title)
    return paths
