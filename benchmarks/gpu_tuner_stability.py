"""How often the GEMV's autotuner (M = 1) keeps a config slower than the best it was offered.

A shape is tuned once per machine and the choice kept on disk (kernels/autotune.py), so a choice
made on a noisy first timing stays. Three H200 tables tuned 8B q/o_proj to 6.9-7.0 us twice and
to 8.5 us once (gpu_kernels_h200_m1_tiles_control.md, gpu_kernels_h200_m1_unaligned_words.md,
gpu_kernels_h200_m1_plain_launches.md). Here each shape is tuned REPEATS times from scratch (no
choice read from or written to disk, compiled kernels kept), for each finalist setting asked for;
then every config any tuning chose is timed again, pinned, in turns, and each tuning is scored by
its choice's time over the best choice's.

    python benchmarks/gpu_tuner_stability.py --out benchmarks/results/gpu_tuner_stability_h200
"""

from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.runtime.autotuner as triton_autotuner

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import autotune, w4a16_triton
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import run_cases  # noqa: E402

CASE_SHAPES = ("8B q/o_proj", "8B k/v_proj", "70B k/v_proj", "8B gate/up_proj")
ROUNDS = 7


class _NoDiskCache:
    """What the autotuner's disk cache looks like to it here: never holding a choice, keeping none."""

    def get_file(self, name):
        return None

    def put(self, data, name, binary=True):
        return None


def tune_once(x: torch.Tensor, packed) -> tuple[str, float]:
    """Tune the GEMV for this shape from scratch; its choice and the seconds the tuning took."""
    w4a16_triton._gemv.cache.clear()
    torch.cuda.synchronize()
    start = time.perf_counter()
    w4a16_triton.matmul(x, packed)
    torch.cuda.synchronize()
    return w4a16_triton.tuned_config(1, packed), time.perf_counter() - start


def run_shape(name: str, settings: list[tuple[int, float]], repeats: int) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128),
                                                   torch.randn(n, k, device="cuda")))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w4a16_triton.matmul(x, packed)  # compiles every candidate once, outside the timed tunings
    saved = autotune.FINALISTS, autotune.FINALIST_MARGIN
    tunings = []
    try:
        for finalists, margin in settings:
            autotune.FINALISTS, autotune.FINALIST_MARGIN = finalists, margin
            for _ in range(repeats):
                config, seconds = tune_once(x, packed)
                tunings.append({"finalists": finalists, "margin": margin, "config": config, "seconds": seconds})
    finally:
        autotune.FINALISTS, autotune.FINALIST_MARGIN = saved
    chosen = sorted({t["config"] for t in tunings})
    times = {config: [] for config in chosen}
    for _ in range(ROUNDS):  # in turns, so a drift in the GPU's clocks touches every config alike
        for config in chosen:
            w4a16_triton._gemv.cache.clear()
            with w4a16_triton.pinned_config(1, config):
                times[config].append(1000 * graph_time_ms(lambda: w4a16_triton.matmul(x, packed)))
    w4a16_triton._gemv.cache.clear()
    medians = {config: statistics.median(t) for config, t in times.items()}
    best = min(medians.values())
    for t in tunings:
        t.update(shape=name, us=medians[t["config"]], over_best=medians[t["config"]] / best)
        print(t, flush=True)
    return tunings


def markdown(tunings: list[dict], device: str, repeats: int) -> str:
    lines = [f"The GEMV's autotuner (M = 1, asym g128) run {repeats} times from scratch per shape and finalist "
             f"setting, on {device} (torch {torch.__version__}, triton {triton.__version__}). `us`: the chosen "
             f"config's median over {ROUNDS} pinned timings in turns after all tunings (CUDA-graph replays, cold "
             "L2); `over best`: that over the best config any tuning of the shape chose.", "",
             "| shape | finalists (margin) | tunings | distinct choices | worst over best | mean over best | "
             "tunings >5% over best | median tuning s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for t in tunings:
        groups.setdefault((t["shape"], t["finalists"], t["margin"]), []).append(t)
    for (shape, finalists, margin), group in groups.items():
        ratios = [t["over_best"] for t in group]
        lines.append(f"| {shape} | {finalists} ({margin:.2f}) | {len(group)} | {len({t['config'] for t in group})} | "
                     f"{max(ratios):.2f}x | {statistics.mean(ratios):.3f}x | {sum(r > 1.05 for r in ratios)} | "
                     f"{statistics.median(t['seconds'] for t in group):.2f} |")
    lines += ["", "| shape | config | us |", "|---|---|---:|"]
    for shape in dict.fromkeys(t["shape"] for t in tunings):
        for config, us in sorted({(t["config"], t["us"]) for t in tunings if t["shape"] == shape}, key=lambda c: c[1]):
            lines.append(f"| {shape} | {config} | {us:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    parser.add_argument("--shapes", nargs="+", default=list(CASE_SHAPES))
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=[f"{autotune.FINALISTS}:{autotune.FINALIST_MARGIN}"],
                        help="finalist settings to compare, FINALISTS:MARGIN each (default: the autotuner's own)")
    args = parser.parse_args()
    settings = [(int(f), float(m)) for f, m in (s.split(":") for s in args.settings)]
    triton_autotuner.get_cache_manager = lambda key: _NoDiskCache()
    run_cases(args.out, args.shapes, lambda name: run_shape(name, settings, args.repeats),
              lambda tunings: markdown(tunings, torch.cuda.get_device_name(), args.repeats))


if __name__ == "__main__":
    main()
