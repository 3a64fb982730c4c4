"""Greedy selection of a decode step: torch.argmax over the vocabulary against lowbit.generate.greedy_ids.

An eager profile of an 8B-shaped int4 decode step at batch 1 gave torch.argmax over 128256
float32 logits 28 us (one reduction kernel; gpu_decode_h200_read_flush.md), 1.3% of the step.
This times both over the logits of a few vocabularies at batch 1 and 16 (CUDA-graph replays,
medians of rounds in turns) and checks they pick the same ids, ties and all.

    python benchmarks/gpu_argmax.py --out benchmarks/results/gpu_argmax_h200
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from lowbit.generate import greedy_ids
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

VOCABULARIES = {"Llama 3": 128256, "Qwen2.5": 151936, "Llama 2": 32000, "SmolLM2": 49152}
ROUNDS = 5


def run_case(case: tuple[str, int]) -> list[dict]:
    name, batch = case
    vocab = VOCABULARIES[name]
    logits = torch.randn(batch, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    logits[:, vocab // 3] = logits[:, 2 * vocab // 3] = 10.0  # a tie: the first must win, as argmax's
    if not torch.equal(greedy_ids(logits), logits.argmax(dim=-1, keepdim=True)):
        raise SystemExit(f"{name} batch {batch}: greedy_ids and argmax disagree")
    times = {"argmax": [], "greedy_ids": []}
    for _ in range(ROUNDS):
        times["argmax"].append(1000 * graph_time_ms(lambda: logits.argmax(dim=-1, keepdim=True)))
        times["greedy_ids"].append(1000 * graph_time_ms(lambda: greedy_ids(logits)))
    row = {"vocabulary": name, "size": vocab, "batch": batch,
           **{f"{kind} us": statistics.median(values) for kind, values in times.items()}}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict]) -> str:
    lines = [f"Greedy selection over float32 logits on {torch.cuda.get_device_name()} (torch {torch.__version__}); "
             f"microseconds per call, CUDA-graph replays, medians of {ROUNDS} rounds in turns "
             "(benchmarks/gpu_argmax.py).", "",
             "| vocabulary | size | batch | torch.argmax | greedy_ids | argmax / greedy_ids |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['vocabulary']} | {r['size']} | {r['batch']} | {r['argmax us']:.1f} | {r['greedy_ids us']:.1f} | "
              f"{r['argmax us'] / r['greedy_ids us']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    run_cases(args.out, [(name, batch) for name in VOCABULARIES for batch in (1, 16)], run_case, markdown)


if __name__ == "__main__":
    main()
