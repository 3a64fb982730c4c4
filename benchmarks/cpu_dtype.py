"""`lowbit quantize --dtype float32` against `--dtype bfloat16` on the CPU, side by side in one call.

The embedded model is a GGUF file, which loads in float32 unless asked otherwise. On a CPU with
bfloat16 instructions (AVX-512 BF16, AMX) its matmuls run several times faster in bfloat16, so the
calibration passes and the evaluation do too; this measures how much of that a whole run keeps and
what it costs in accuracy. Runs alternate between the two dtypes; times are medians.

    python benchmarks/cpu_dtype.py --out benchmarks/results/cpu_dtype
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

from lowbit.api import Settings, quantize
from lowbit.recipes import Recipe

from common import DATA, machine_of
from results_file import save

DTYPES = ("float32", "bfloat16")


def run(dtype: str, recipe: Recipe, settings: Settings) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        report = quantize(None, recipe, Path(folder) / "out", dataclasses.replace(settings, dtype=dtype))
    result = report.evaluation_result
    return {"dtype": dtype, "quantize_s": report.seconds["quantize"], "evaluate_s": report.seconds["evaluate"],
            "perplexity": result.perplexity, "original_perplexity": result.reference_perplexity, "kl": result.kl,
            "scale_dtype": report.recipe.scale_dtype, "export_max_abs_diff": report.export_max_abs_diff}


def render(rows: list[dict], recipe: Recipe, settings: Settings) -> str:
    runs = {dtype: [row for row in rows if row["dtype"] == dtype] for dtype in DTYPES}
    median = {dtype: {key: statistics.median(row[key] for row in runs[dtype]) for key in ("quantize_s", "evaluate_s")}
              for dtype in DTYPES if runs[dtype]}
    lines = [
        f"SmolLM2-135M-Instruct (embedded GGUF), {recipe.method} int{recipe.bits} "
        f"{'sym' if recipe.symmetric else 'asym'} group {recipe.group_size}, calibration {settings.samples} x "
        f"{settings.seq_len} tokens of wikitext-2 valid, evaluation {settings.eval_windows} windows of "
        f"{settings.eval_seq_len} of wikitext-2 test, on {machine_of('cpu')}; `python benchmarks/cpu_dtype.py`. "
        "Times are medians of the runs (alternating); the evaluation scores the original and the quantized model.",
        "",
        "| --dtype | runs | quantize s | evaluate s | perplexity (original) | KL | scales | reloaded export: max logit diff |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for dtype in median:
        last = runs[dtype][-1]
        lines.append(f"| {dtype} | {len(runs[dtype])} | {median[dtype]['quantize_s']:.1f} | "
                     f"{median[dtype]['evaluate_s']:.1f} | {last['perplexity']:.3f} ({last['original_perplexity']:.3f}) | "
                     f"{last['kl']:.4f} | {last['scale_dtype']} | {last['export_max_abs_diff']:.2e} |")
    if len(median) == 2:
        ratio = {key: median["float32"][key] / median["bfloat16"][key] for key in ("quantize_s", "evaluate_s")}
        lines += ["", f"float32 / bfloat16 time: quantize {ratio['quantize_s']:.2f}x, evaluate {ratio['evaluate_s']:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each dtype, alternating")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    args = parser.parse_args()

    recipe = Recipe(method="gptq", bits=4, symmetric=False)  # groups of 128 where they divide, else 64
    settings = Settings(calib=str(DATA / "valid.txt"), samples=args.samples, eval_data=str(DATA / "test.txt"),
                        eval_windows=args.windows, device="cpu")
    rows: list[dict] = []
    for _ in range(args.repeats):
        for dtype in DTYPES:
            rows.append(run(dtype, recipe, settings))
            save(args.out, render(rows, recipe, settings), rows)
    print(render(rows, recipe, settings))


if __name__ == "__main__":
    main()
