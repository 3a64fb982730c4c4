"""`lowbit compare`: its arguments and its terminal table. The work is in lowbit.compare.runner."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lowbit.solvers import SOLVERS

DEFAULT_METHODS = "rtn,gptq"


def _group_size(value: str) -> int | str:
    named = {"auto": "auto", "channel": -1, "tensor": 0}
    try:
        return named[value] if value in named else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, auto, channel or tensor: {value!r}") from None


def _list(convert):
    def parse(text: str) -> list:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [convert(v) for v in values]

    return parse


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    c = commands.add_parser("compare", help="quantize a model many ways; table, Pareto plot and HTML report")
    c.add_argument("model", nargs="?", help="Hugging Face id, local folder or .gguf file (default: embedded model)")
    c.add_argument("--methods", type=_list(str), default=_list(str)(DEFAULT_METHODS),
                   help=f"solvers, comma-separated (default {DEFAULT_METHODS}; registered: {', '.join(sorted(SOLVERS))})")
    c.add_argument("--bits", type=_list(int), default=[2, 3, 4], help="bits per code, comma-separated (default 2,3,4)")
    c.add_argument("--group-sizes", type=_list(_group_size), default=[64],
                   help="columns per scale, comma-separated; -1 per channel, 0 per tensor, auto (default 64)")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=[True], help="symmetric grids only")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=[False],
                     help="zero points only (default)")
    sym.add_argument("--sym-and-asym", dest="symmetric", action="store_const", const=[True, False],
                     help="both, as a grid axis")
    c.add_argument("--axis", action="append", default=[], metavar="FIELD=V1,V2",
                   help="any other recipe field as a grid axis, e.g. scale_dtype=float16,bfloat16 or "
                   "method_options={damp: 0.01},{damp: 0.1} (repeatable)")
    c.add_argument("--peers", type=_list(str), default=[],
                   help="other tools on the same schemes: llmcompressor (= llmcompressor-gptq,llmcompressor-awq), hqq")
    c.add_argument("--tasks", type=_list(str), default=[],
                   help="lm-eval-harness tasks (names, or task YAML files), where their data is reachable")
    c.add_argument("--task-limit", type=int, help="lm-eval: at most this many examples per task")
    c.add_argument("--calib", metavar="PATH_OR_DATASET", help="calibration text (.txt/.jsonl, wikitext2, c4, self)")
    c.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--data", dest="eval_data", metavar="PATH_OR_DATASET",
                   help="evaluation text (.txt/.jsonl, wikitext2, c4, self; default wikitext2 test where reachable)")
    c.add_argument("--eval-seq-len", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    c.add_argument("--eval-windows", type=int, default=8,
                   help="evaluation windows; the original's log-probabilities on them are held in memory (default 8)")
    c.add_argument("--batch-size", type=int, help="calibration windows per forward pass (default: all at once)")
    c.add_argument("--out", type=Path, default=Path("compare"), help="output folder; its cells/ cache makes re-runs resume")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--seed", type=int, default=0)
    return c


def axes_from_args(args: argparse.Namespace) -> dict[str, list[Any]]:
    from lowbit.compare.grid import parse_axis

    axes: dict[str, list[Any]] = {"method": args.methods, "bits": args.bits, "group_size": args.group_sizes,
                                  "symmetric": args.symmetric or [False]}
    for spec in args.axis:
        field, values = parse_axis(spec)
        axes[field] = values
    return axes


def run(args: argparse.Namespace, console: Console, argv: list[str] | None = None) -> None:
    """Run the grid; `argv` (default sys.argv[1:]) is recorded as the command in the outputs."""
    from lowbit.compare.grid import build_cells
    from lowbit.compare.peers import expand_peer_names
    from lowbit.compare.report import write_outputs
    from lowbit.compare.runner import CompareSettings, run_compare

    for name in ("samples", "seq_len", "eval_seq_len", "eval_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    axes = axes_from_args(args)
    cells = build_cells(axes, expand_peer_names(args.peers))
    if args.peers and "auto" in axes["group_size"]:
        console.print("[yellow]note:[/] peers are not run on group size 'auto' (a per-layer choice of lowbit's)")
    settings = CompareSettings(calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                               eval_data=args.eval_data, eval_seq_len=args.eval_seq_len,
                               eval_windows=args.eval_windows, tasks=args.tasks, task_limit=args.task_limit,
                               device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    console.print(f"[bold]lowbit compare[/]: {len(cells)} cells into {args.out}")

    def on_cell(record: dict[str, Any]) -> None:
        console.print(f"  {record['label']}: {_summary(record)}", highlight=False)

    result = run_compare(args.model, cells, settings, args.out, on_cell=on_cell,
                         on_note=lambda note: console.print(f"[yellow]note:[/] {note}", highlight=False))
    result.meta["command"] = "lowbit " + shlex.join(sys.argv[1:] if argv is None else argv)
    paths = write_outputs(result, args.out)
    print_table(result, paths, console)


def _summary(record: dict[str, Any]) -> str:
    if record["status"] in ("skipped", "failed"):
        return f"{record['status']} ({record.get('note', '')})"
    return (f"{record['status']}, {record['bits_per_weight']:.3f} bits/weight, perplexity {record['perplexity']:.3f}, "
            f"KL {record['kl']:.4f}, {record['quantize_seconds']:.1f} s")


def print_table(result, paths: dict[str, Path], console: Console) -> None:
    from lowbit.compare.writers import mark_fronts

    rows = mark_fronts(result)
    table = Table(title=f"{result.meta['model']}: {len(rows)} cells")
    for header in ("cell", "bits/weight", "model MB", "perplexity", "KL", "quantize s", "front", "status"):
        table.add_column(header, justify="left" if header in ("cell", "status", "front") else "right")
    o = result.original
    table.add_row("original", f"{o['bits_per_weight']:.0f}", f"{o['model_megabytes']:.1f}",
                  f"{o['perplexity']:.3f}", "0", "-", "", "")
    for row in rows:
        done = row["status"] in ("ok", "cached")
        front = " ".join(n for n, m in (("ppl", "perplexity"), ("KL", "kl")) if row.get(f"pareto_{m}"))
        table.add_row(
            row["label"],
            f"{row['bits_per_weight']:.3f}" if done else "-",
            f"{row['model_megabytes']:.1f}" if done else "-",
            f"{row['perplexity']:.3f}" if done else "-",
            f"{row['kl']:.4f}" if done else "-",
            f"{row['quantize_seconds']:.1f}" if done else "-",
            front,
            row["status"],
            style="bold" if front else None,
        )
    console.print(table)
    console.print(f"calibration: {result.meta['calibration']}")
    console.print(f"evaluation: {result.meta['evaluation']}")
    console.print(f"sizes: {result.meta['size_note']}")
    for note in result.meta.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for row in rows:
        if row["status"] == "failed":
            console.print(f"[red]failed:[/] {row['label']}: {row.get('note', '')}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
