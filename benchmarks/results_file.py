"""How the GPU benchmark scripts save a table: OUT.md for people and OUT.json for scripts, side by side.

`run_cases` saves everything measured so far after every case, so a run stopped by its time limit
(gpu_run_all.sh gives each step one) still leaves the cases it finished.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path


def save(out: Path, text: str, rows: list) -> None:
    """OUT.md holding `text` and OUT.json holding `rows` (`out` without a suffix)."""
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def run_cases(out: Path, cases: Iterable, run_case: Callable[[object], list[dict]],
              render: Callable[[list[dict]], str]) -> None:
    """`run_case` for each case in turn (its rows appended to the last's), the table rendered and
    saved after each; the final table printed."""
    rows: list[dict] = []
    text = ""
    for case in cases:
        rows += run_case(case)
        text = render(rows)
        save(out, text, rows)
    print(text)


def shapes_command(description: str, shapes: Iterable[str], run_shape: Callable[[str], list[dict]],
                   render: Callable[[list[dict]], str]) -> None:
    """The command line of a benchmark timed shape by shape: --out (the results' path without
    suffix) and --shapes (default: all of `shapes`), then `run_cases` over the shapes named."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="+", default=list(shapes))
    args = parser.parse_args()
    run_cases(args.out, args.shapes, run_shape, render)
