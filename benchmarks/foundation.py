"""Foundation benchmark: RTN vs GPTQ on the embedded SmolLM2-135M, WikiText-2 perplexity and KL.

Calibration: random windows of ../shared/data/wikitext-2/valid.txt; evaluation: the first
--eval-windows non-overlapping 2048-token windows of test.txt (never the same file). Every row is
quantized from the same original weights, so rows differ only by method and format.

    python benchmarks/foundation.py                       # writes benchmarks/results/foundation*.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.evaluate import ReferenceLogProbs, evaluate

from common import add_device_argument, embedded_model_protocol, machine_of
from weight_only_methods import SOLVER_VARIANTS, quantize_copy, recipe_for

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (bits, group size); asymmetric, as in the table
    (4, 64),
    (3, 64),
    (4, 32),
    (4, -1),
    (2, 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--settings", default=",".join(f"{b}:{g}" for b, g in SETTINGS),
                        help="comma-separated bits:group_size pairs (-1 = per channel)")
    parser.add_argument("--methods", default="rtn,gptq",
                        help="comma-separated: rtn, gptq (the paper's) or " + ", ".join(SOLVER_VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "foundation")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown_table(saved["meta"], saved["rows"]))
        return
    torch.manual_seed(0)

    protocol = embedded_model_protocol(args.samples, args.seq_len, args.eval_windows, args.device)
    loaded, original, calibration = protocol.loaded, protocol.original, protocol.calibration
    test_tokens, eval_kwargs, reference = protocol.test_tokens, protocol.eval_kwargs, protocol.reference
    rows = [{"method": "original", "bits": 16, "group_size": None, "bits_per_weight": 16.0,
             "perplexity": reference.perplexity(), "kl": 0.0, "seconds": 0.0}]
    print(f"original: perplexity {rows[0]['perplexity']:.3f}", flush=True)
    meta = describe_run(args, loaded, reference)
    for setting in args.settings.split(","):
        bits, group_size = map(int, setting.split(":"))
        for method in args.methods.split(","):
            recipe = recipe_for(method, bits, group_size)
            model, seconds, bpw = quantize_copy(original, recipe, calibration, protocol.device)
            result = evaluate(model, test_tokens, reference=reference, **eval_kwargs)
            rows.append({"method": method, "bits": bits, "group_size": group_size, "bits_per_weight": bpw,
                         "perplexity": result.perplexity, "kl": result.kl, "seconds": seconds})
            print(f"{recipe.describe()}: perplexity {result.perplexity:.3f}, KL {result.kl:.4f}, "
                  f"{seconds:.1f} s", flush=True)
            del model
            save(args, meta, rows)  # after every row, so a long run that is cut short keeps its rows
    print(markdown_table(meta, rows))


def save(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown_table(meta, rows))


def describe_run(args: argparse.Namespace, loaded, reference: ReferenceLogProbs) -> dict:
    return {
        "model": loaded.name,
        "calibration": f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt, seed 0",
        "evaluation": f"first {len(reference.windows)} non-overlapping windows of 2048 tokens of wikitext-2 test.txt "
        f"({reference.scored_tokens} tokens scored)",
        "machine": machine_of(args.device),
        "command": "python benchmarks/foundation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render")),
    }


def markdown_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. Quantize times come from whatever else "
        "the machine was running; compare speed with the side-by-side benchmark, not this column.",
        "",
        "| scheme | method | bits/weight | perplexity | KL to original | quantize time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["method"] == "original":
            scheme, kl = "original (float32 weights)", "0 (itself)"
        else:
            layout = "per-channel" if row["group_size"] == -1 else f"g{row['group_size']}"
            scheme, kl = f"w{row['bits']} asym {layout}", f"{row['kl']:.4f}"
        lines.append(f"| {scheme} | {row['method']} | {row['bits_per_weight']:.3f} | {row['perplexity']:.3f} | "
                     f"{kl} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
