"""Extreme low bits on SmolLM2-135M: scalar GPTQ, dense-and-sparse GPTQ and BiLLM-style binarization
near 2.0, 2.3 and 3.0 bits per weight, each with and without an EoRA rank-r correction.

Same protocol as benchmarks/weight_only_methods.py (whose quantize_copy it uses): calibration =
random windows of ../shared/data/wikitext-2/valid.txt; evaluation = the first --eval-windows
non-overlapping 2048-token windows of test.txt, perplexity and KL(original || quantized). Bits
per weight are measured on the quantized linears and include scales, zero points, bit planes,
salient-column masks, sparse outliers (value + index + row offsets) and the fp16 EoRA factors.

Rows from the vector-quantization benchmark (benchmarks/results/vq.json, a list of rows with keys
method, bits_per_weight, perplexity, kl; or {"rows": [...]}) join the table and the plot when
that file exists.

    python benchmarks/extreme_low_bits.py                       # all rows: results/extreme_low_bits.{json,md,png}
    python benchmarks/extreme_low_bits.py --rows gptq-w2-ch --samples 8 --eval-windows 1 --out /tmp/smoke
    python benchmarks/extreme_low_bits.py --render              # table and plot again, e.g. after vq.json appears
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.compare.pareto import pareto_front
from lowbit.compare.plot import plot_pareto
from lowbit.evaluate import evaluate
from lowbit.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import add_device_argument, embedded_model_protocol  # noqa: E402  (benchmarks/ is a folder of scripts)
from weight_only_methods import describe_run, merged, quantize_copy, recipe_for  # noqa: E402

VQ_RESULTS = [ROOT / "benchmarks" / "results" / f"{name}.json" for name in ("vq", "vq_eora")]
EORA_RANK = 4
"""Rank of the EoRA rows: +0.15..0.22 bits per weight on SmolLM2's 576/1536-wide matrices."""


def _gptq(bits: int, group_size: int, outliers: float = 0.0) -> Recipe:
    """Scalar GPTQ as the integer schemes run it (ranges fitted on the original weights, MSE clipping)."""
    return recipe_for("gptq-static-mse", bits, group_size).model_copy(update={"outliers": outliers})


CONFIGS: dict[str, tuple[str, Recipe]] = {
    # name: (family shown in the table, recipe). SmolLM2's widths (576, 1536) take groups of 64.
    "gptq-w2-ch": ("gptq", _gptq(2, -1)),
    "gptq-w2-g64": ("gptq", _gptq(2, 64)),
    "gptq-w3-ch": ("gptq", _gptq(3, -1)),
    "ds-w2-ch": ("gptq + outliers", _gptq(2, -1, outliers=0.0025)),
    "ds-w2-ch-1%": ("gptq + outliers", _gptq(2, -1, outliers=0.01)),
    "ds-w3-ch": ("gptq + outliers", _gptq(3, -1, outliers=0.0025)),
    "binary-g64": ("binary + salient", Recipe(method="binary", format="binary", bits=1, group_size=64)),
    "binary-split-ch": ("binary + salient", Recipe(method="binary", format="binary", bits=2, group_size=-1)),
    "binary-split-g64": ("binary + salient", Recipe(method="binary", format="binary", bits=2, group_size=64)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--rows", default=",".join(CONFIGS), help="comma-separated among " + ", ".join(CONFIGS).replace("%", "%%"))
    parser.add_argument("--eora-rank", type=int, default=EORA_RANK, help="rank of the +eora rows (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extreme_low_bits")
    parser.add_argument("--render", action="store_true", help="only rewrite the table and plot from the saved .json")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="add the rows of other saved runs (same model, calibration and evaluation) to --out")
    add_device_argument(parser)
    args = parser.parse_args()
    unknown = set(args.rows.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown row(s) {', '.join(sorted(unknown))}; choose among {', '.join(CONFIGS)}")
    if args.render or args.merge:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        for path in args.merge or []:
            saved = merged(saved, json.loads(path.read_text()), path)
        save(args.out, saved["meta"], saved["rows"])
        return
    protocol = embedded_model_protocol(args.samples, args.seq_len, args.eval_windows, args.device)
    loaded, original, calibration = protocol.loaded, protocol.original, protocol.calibration
    test_tokens, eval_kwargs, reference = protocol.test_tokens, protocol.eval_kwargs, protocol.reference
    rows: list[dict] = []
    meta: dict = {}
    for name in args.rows.split(","):
        family, base = CONFIGS[name]
        variants = [(family, name, base)]
        if args.eora_rank:
            variants.append((f"{family} + eora", f"{name}+eora{args.eora_rank}",
                             base.model_copy(update={"eora_rank": args.eora_rank})))
        for method, label, recipe in variants:
            model, seconds, bpw = quantize_copy(original, recipe, calibration, protocol.device)
            result = evaluate(model, test_tokens, reference=reference, **eval_kwargs)
            if not meta:
                meta = describe_run(args, loaded, result, "extreme_low_bits.py", "every row")
                meta["calibration"] = f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt, seed 0"
                meta["command"] = "python benchmarks/extreme_low_bits.py " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render"))
                meta["original_perplexity"] = result.reference_perplexity
            rows.append({"method": method, "label": label, "recipe": recipe.describe(), "bits_per_weight": bpw,
                         "perplexity": result.perplexity, "kl": result.kl, "seconds": seconds})
            print(f"{label} ({recipe.describe()}): perplexity {result.perplexity:.3f}, KL {result.kl:.4f}, "
                  f"{bpw:.3f} bits/weight, {seconds:.1f} s", flush=True)
            del model
            save(args.out, meta, rows)  # after every row: a run cut short keeps what it measured


def with_vq_rows(rows: list[dict]) -> list[dict]:
    """Our rows plus those of benchmarks/results/vq.json (and vq_eora.json) where the VQ benchmark wrote them."""
    required = ("method", "bits_per_weight", "perplexity", "kl")
    vq = []
    for path in VQ_RESULTS:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        other = data["rows"] if isinstance(data, dict) else data
        machine = data["meta"]["machine"] if isinstance(data, dict) and "meta" in data else None
        vq += [{**row, "label": row.get("label", row["method"]), "source": path.name, "machine": machine}
               for row in other if all(key in row for key in required) and row["method"] != "original"]
    return rows + vq


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    shown = sorted(with_vq_rows(rows), key=lambda row: row["bits_per_weight"])
    for metric in ("perplexity", "kl"):
        front = set(pareto_front([(row["bits_per_weight"], row[metric]) for row in shown]))
        for index, row in enumerate(shown):
            row[f"pareto_{metric}"] = index in front
    out.with_suffix(".md").write_text(markdown_table(meta, shown))
    plotted = [{**row, "status": "ok"} for row in shown]
    plot_pareto(plotted, {"perplexity": meta.get("original_perplexity")}, out.with_suffix(".png"),
                f"SmolLM2-135M at extreme low bits ({meta.get('evaluation', '')})")


def markdown_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. Original perplexity: "
        f"{meta['original_perplexity']:.3f}. Rows from vq.json and vq_eora.json (if any) come from benchmarks/vq.py.",
        "",
        "| row | method | recipe | bits/weight | perplexity | KL to original | quantize time (s) | machine |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if "seconds" in row else "-"
        best = " *" if row.get("pareto_perplexity") else ""
        machine = (row.get("machine") or meta["machine"]).split(",")[0]
        lines.append(f"| {row['label']}{best} | {row['method']} | {row.get('recipe', row.get('source', ''))} | "
                     f"{row['bits_per_weight']:.3f} | {row['perplexity']:.3f} | {row['kl']:.4f} | {seconds} | "
                     f"{machine} |")
    lines.append("")
    lines.append("`*`: on the perplexity-vs-bits Pareto front.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
