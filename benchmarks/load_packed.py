"""Time `load_packed` (an export read back onto its codes, as `lowbit generate` does) at two commits.

Writes an int4 (or, with --kind vq, a vector-quantized) export of a random Llama-3-8B-shaped
model with --layers decoder layers (gpu_export.py), then loads it in a fresh process per run,
alternating between this checkout and a git worktree of --against, so both see the same page
cache; reports the median seconds and peak resident memory of each (Linux: VmHWM).

    python benchmarks/load_packed.py --layers 4 --runs 3 --against HEAD~1 --out benchmarks/results/load_packed_cpu
    python benchmarks/load_packed.py --kind vq --layers 2 --against c945553 --out benchmarks/results/load_packed_vq_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_export import write_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Peak memory from VmHWM, which starts afresh with the process's own address space: ru_maxrss would
# carry over the driver's resident size at the fork (the model it built to write the export).
MEASURE = """
import json, sys, time
import lowbit
from lowbit.export.packed_load import load_packed
start = time.perf_counter()
model, _, swapped = load_packed(sys.argv[1], "cpu")
seconds = time.perf_counter() - start
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_kb / 2**20, "swapped": swapped}))
"""


def measure(src: Path, export: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(export)], env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"load_packed failed with {src}:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def commit_of(checkout: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", required=True, help="the git revision to compare with, e.g. HEAD~1")
    parser.add_argument("--kind", choices=("int4", "vq"), default="int4",
                        help="int4 (compressed-tensors) or vq (lowbit's layout, VQLinear) layers")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: writes .json and .md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "against"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            export = write_export(args.layers, Path(tmp) / "export", torch.device("cpu"), args.kind)
            theirs = commit_of(worktree)
            variants = {f"this checkout ({commit_of(ROOT)})": ROOT / "src",
                        args.against if theirs.startswith(args.against) else f"{args.against} ({theirs})": worktree / "src"}
            runs = {name: [] for name in variants}
            for _ in range(args.runs):
                for name, src in variants.items():
                    runs[name].append(measure(src, export))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    rows = {name: {"seconds": statistics.median(r["seconds"] for r in results),
                   "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in results),
                   "swapped": results[0]["swapped"], "runs": results} for name, results in runs.items()}
    (mine, theirs) = rows.values()
    described = "an int4 g128" if args.kind == "int4" else "a VQ (8-bit codes of 4-vectors, lowbit's layout)"
    header = (f"load_packed of {described} export of a random Llama-3-8B-shaped model, {args.layers} decoder layers, "
              f"on the CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}); median of {args.runs} fresh processes each, alternating.")
    lines = [header, "", "| code | seconds | peak RSS GB | layers on their codes |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['seconds']:.2f} | {row['peak_rss_gb']:.2f} | {row['swapped']} |"
              for name, row in rows.items()]
    lines += ["", f"{list(rows)[1]} / this checkout: {theirs['seconds'] / mine['seconds']:.1f}x the time, "
              f"{theirs['peak_rss_gb'] / mine['peak_rss_gb']:.1f}x the memory"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"layers": args.layers, "kind": args.kind, "rows": rows},
                                                        indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
