"""A self-contained HTML report: the plot inlined as base64, a table sortable by any column.

No stylesheet, script or font is fetched from anywhere: the file opens the same offline, attached to
an e-mail or in a CI artefact viewer.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from lowbit.compare.writers import finished, task_columns

COLUMNS = [  # (header, row key, format)
    ("cell", "label", "{}"),
    ("tool", "tool", "{}"),
    ("bits/weight", "bits_per_weight", "{:.3f}"),
    ("model MB", "model_megabytes", "{:.1f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("KL to original", "kl", "{:.4f}"),
    ("quantize s", "quantize_seconds", "{:.1f}"),
    ("Pareto (ppl / KL)", None, ""),
    ("status", "status", "{}"),
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-order="asc"]::after { content: " \\25B2"; }
th[data-order="desc"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td { background: #eef7ee; font-weight: 600; }
tr.original td { background: #f6f6ff; }
tr.skipped td, tr.failed td { color: #888; }
img { max-width: 100%; }
.meta { font-size: 13px; color: #444; }
"""

SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var order = th.dataset.order === "asc" ? "desc" : "asc";
    th.closest("tr").querySelectorAll("th").forEach(function (other) { delete other.dataset.order; });
    th.dataset.order = order;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y), result;
      if (!isNaN(nx) && !isNaN(ny)) { result = nx - ny; }
      else if (!isNaN(nx)) { result = -1; } else if (!isNaN(ny)) { result = 1; }
      else { result = String(x).localeCompare(String(y)); }
      return order === "asc" ? result : -result;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def write_html(meta: dict[str, Any], original: dict[str, Any], rows: list[dict[str, Any]], png: Path | None,
               path: Path, title: str) -> None:
    tasks = task_columns([original, *rows])
    image = ""
    if png is not None and png.is_file():
        encoded = base64.b64encode(png.read_bytes()).decode()
        image = f'<img alt="Pareto plot" src="data:image/png;base64,{encoded}">'
    headers = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS)
    headers += "".join(f"<th>{html.escape(column)}</th>" for column in tasks)
    body = "\n".join(_row(row, tasks) for row in [original, *rows])
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in meta.get("notes", []))
    details = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(str(meta[k]))}</li>"
        for k in ("model", "calibration", "evaluation", "tasks", "size_note", "machine", "versions", "command",
                  "finished")
        if meta.get(k) is not None
    )
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{image}
<h2>Cells</h2>
<p class="meta">Click a column header to sort. Highlighted rows are on the Pareto front of perplexity or KL
against bits per weight.</p>
<table class="sortable" id="results"><thead><tr>{headers}</tr></thead>
<tbody>
{body}
</tbody></table>
<h2>Run</h2>
<ul class="meta">{details}</ul>
{f'<h2>Notes</h2><ul class="meta">{notes}</ul>' if notes else ''}
<script>{SCRIPT}</script>
</body></html>
"""
    path.write_text(document)


def _row(row: dict[str, Any], tasks: list[str]) -> str:
    cells = []
    for _, key, fmt in COLUMNS:
        if key is None:
            marks = [name for name, metric in (("ppl", "perplexity"), ("KL", "kl")) if row.get(f"pareto_{metric}")]
            text = " / ".join(marks)
            cells.append(f'<td data-value="{len(marks)}">{text}</td>')
            continue
        cells.append(_cell(row.get(key), fmt))
    for column in tasks:
        task, metric = column.split(":", 1)
        cells.append(_cell((row.get("tasks") or {}).get(task, {}).get(metric), "{:.4f}"))
    classes = []
    if row.get("tool") == "original":
        classes.append("original")
    elif not finished(row):
        classes.append(str(row.get("status")))
    if row.get("pareto_perplexity") or row.get("pareto_kl"):
        classes.append("front")
    title = f' title="{html.escape(row["note"])}"' if row.get("note") else ""
    return f'<tr class="{" ".join(classes)}"{title}>{"".join(cells)}</tr>'


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return '<td data-value="">-</td>'
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = html.escape(str(value))
        return f'<td data-value="{text}">{text}</td>'
    shown = fmt.format(value) if math.isfinite(value) else str(value)
    return f'<td class="num" data-value="{value!r}">{html.escape(shown)}</td>'
