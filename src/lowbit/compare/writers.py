"""results.json and results.csv of a comparison, with each cell's place on the Pareto fronts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lowbit.compare.pareto import pareto_front
from lowbit.compare.runner import CompareResult

METRICS = ("perplexity", "kl")
"""Quality measures a front is drawn for, each against bits per weight (lower is better for all)."""

CSV_COLUMNS = [
    "label", "tool", "method", "bits", "group_size", "symmetric", "bits_per_weight", "model_megabytes",
    "perplexity", "kl", "quantize_seconds", "pareto_perplexity", "pareto_kl", "status", "note", "version", "key",
]


def finished(record: dict[str, Any]) -> bool:
    return record.get("status") in ("ok", "cached")


def mark_fronts(result: CompareResult) -> list[dict[str, Any]]:
    """The cells' rows with `pareto_<metric>` set: True on the front of that metric vs bits/weight."""
    rows = [dict(record) for record in result.cells]
    done = [i for i, row in enumerate(rows) if finished(row)]
    for metric in METRICS:
        for row in rows:
            row[f"pareto_{metric}"] = False
        points = [(rows[i]["bits_per_weight"], rows[i][metric]) for i in done]
        for position in pareto_front(points):
            rows[done[position]][f"pareto_{metric}"] = True
    return rows


def write_json(result: CompareResult, rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps({"meta": result.meta, "original": result.original, "cells": rows}, indent=2))


def task_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for task, metrics in (row.get("tasks") or {}).items():
            for metric in metrics:
                if f"{task}:{metric}" not in columns:
                    columns.append(f"{task}:{metric}")
    return columns


def write_csv(result: CompareResult, rows: list[dict[str, Any]], path: Path) -> None:
    """One line per cell after the original's; task metrics as `task:metric` columns."""
    everything = [{**result.original, "pareto_perplexity": "", "pareto_kl": ""}] + rows
    tasks = task_columns(everything)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS + tasks, extrasaction="ignore")
        writer.writeheader()
        for row in everything:
            flat = {column: row.get(column, "") for column in CSV_COLUMNS}
            for column in tasks:
                task, metric = column.split(":", 1)
                flat[column] = (row.get("tasks") or {}).get(task, {}).get(metric, "")
            writer.writerow({k: "" if v is None else v for k, v in flat.items()})


def write_markdown(result: CompareResult, rows: list[dict[str, Any]], path: Path) -> None:
    """The table as Markdown with the run's settings above it (what the README shows)."""
    meta = result.meta
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}.",
        f"Sizes: {meta['size_note']}. Machine: {meta['machine']}; quantize times depend on what else it was running.",
        f"Command: `{meta.get('command')}`",
        "",
        "| cell | tool | bits/weight | model MB | perplexity | KL to original | quantize s | Pareto front |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    o = result.original
    lines.append(f"| original ({o.get('original_dtype', 'unquantized')} weights) | - | {o['bits_per_weight']:.3f} | "
                 f"{o['model_megabytes']:.1f} | {o['perplexity']:.3f} | 0 (itself) | - | |")
    for row in rows:
        if not finished(row):
            lines.append(f"| {row['label']} | {row['tool']} | - | - | - | - | - | {row['status']}: {row.get('note', '')} |")
            continue
        front = ", ".join(name for name, metric in (("perplexity", "perplexity"), ("KL", "kl"))
                          if row.get(f"pareto_{metric}"))
        lines.append(f"| {row['label']} | {row.get('version', row['tool'])} | {row['bits_per_weight']:.3f} | "
                     f"{row['model_megabytes']:.1f} | {row['perplexity']:.3f} | {row['kl']:.4f} | "
                     f"{row['quantize_seconds']:.1f} | {front} |")
    lines += [""] + [f"Note: {note}" for note in meta.get("notes", [])]
    path.write_text("\n".join(lines).rstrip() + "\n")
