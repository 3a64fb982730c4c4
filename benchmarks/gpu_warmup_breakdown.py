"""Where the first warm-up of `lowbit generate` goes: compiling, timing and choosing, per kernel.

A first run of `lowbit generate` on an export spends 14-17 s warming up on an H200 (the
gpu_generate_b*_h200.log files), against about 1 s once the tunings are on disk. Halving the
Gluon tile's and the GEMV's first-round candidates (autotune's finalist variants) took 1.5 s off
at batch 1 and nothing at batch 16, so the count of timings is not what the warm-up is made of.
This runs the warm-up of `generate_text` (few tokens) with every phase of the tuning timed:

- compile: a tuner's candidates built on the thread pool before its first round, or its
  finalists' variants before they are timed (kernels/autotune.py);
- time: one timing of one candidate (CUDA-graph replays, timing.py), first round or finalists';
- choose: the dispatcher timing its paths for a shape and M bucket (kernels/w4a16.py), less what
  the tuners nested in it took;
- the rest: graph capture, the prompt, layouts built on first use, FBGEMM and cuBLAS set-up.

Run it once per batch size against one Triton cache directory, as the `warmup_breakdown` step of
gpu_run_all.sh does, so the first run is cold and the later ones find what it compiled:

    TRITON_CACHE_DIR=/tmp/tc python benchmarks/gpu_warmup_breakdown.py /tmp/int4-8b --batch 1 --out b1
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from pathlib import Path

import torch
from triton.runtime.autotuner import Autotuner

from lowbit.api import generate_text
from lowbit.kernels import autotune, w4a16

_open: list[list[float]] = []  # for each timed call in progress: [its start, its children's seconds]
_seconds: dict[tuple[str, str], float] = defaultdict(float)  # (phase, what) -> exclusive seconds
_calls: dict[tuple[str, str], int] = defaultdict(int)
_refining: list[bool] = [False]


def _timed(phase_of, method):
    """`method` wrapped to add its exclusive wall time (less nested timed calls) under phase_of(self, ...)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        _synchronize()
        _open.append([time.perf_counter(), 0.0])
        try:
            return method(*args, **kwargs)
        finally:
            _synchronize()
            start, children = _open.pop()
            spent = time.perf_counter() - start
            key = phase_of(*args, **kwargs)
            _seconds[key] += spent - children
            _calls[key] += 1
            if _open:
                _open[-1][1] += spent

    return wrapper


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel(tuner) -> str:
    return tuner.base_fn.__name__


def _refine(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        _refining[0] = True
        try:
            return method(*args, **kwargs)
        finally:
            _refining[0] = False

    return wrapper


def instrument() -> None:
    tuner = autotune.ParallelCompileAutotuner
    tuner._compile_all = _timed(
        lambda self, configs: ("compile variants" if _refining[0] else "compile", _kernel(self)), tuner._compile_all)
    tuner._time_finalists_again = _refine(tuner._time_finalists_again)
    Autotuner._bench = _timed(lambda self, *a, **k: ("time finalists" if _refining[0] else "time", _kernel(self)),
                              Autotuner._bench)
    choose, timed_choose = w4a16._choose, _timed(lambda x, packed: ("choose", f"M {x.shape[0]}"), w4a16._choose)

    def first_choice_timed(x, packed):  # every matmul asks; only a first choice outside a capture is timed
        if w4a16._choice_key(x, packed) in w4a16._CHOSEN or torch.cuda.is_current_stream_capturing():
            return choose(x, packed)
        return timed_choose(x, packed)

    w4a16._choose = first_choice_timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="a lowbit int4 export (benchmarks/gpu_export.py writes one)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args()
    instrument()
    report = generate_text(args.export, "w1 w2 w3 w4 w5 w6 w7 w8", new_tokens=4, batch=args.batch)
    accounted = sum(_seconds.values())
    total = report.warmup_seconds + report.prompt_seconds
    lines = [f"`lowbit generate` warm-up and prompt at batch {args.batch} on {torch.cuda.get_device_name()} "
             f"(benchmarks/gpu_warmup_breakdown.py): {total:.1f} s; exclusive wall seconds "
             "per phase (GPU synchronised around each timed call).", "",
             "| phase | kernel or M | calls | seconds |", "|---|---|---:|---:|"]
    for (phase, what), seconds in sorted(_seconds.items(), key=lambda item: -item[1]):
        lines.append(f"| {phase} | {what} | {_calls[phase, what]} | {seconds:.2f} |")
    lines.append(f"| the rest (capture, prompt, layouts, library set-up) | | | "
                 f"{total - accounted:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
