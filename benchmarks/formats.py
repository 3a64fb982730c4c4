"""Number formats on SmolLM2-135M: RTN and GPTQ for FP8, NVFP4, MXFP4, NF4, learned tables and int4 g32.

Calibration: random windows of ../shared/data/wikitext-2/valid.txt; evaluation: the first
--eval-windows non-overlapping 2048-token windows of test.txt. Every row starts from the same
original weights, so rows differ only by format and method. Bits per weight count every scale,
table and per-tensor scale of the quantized linears. Learned per-row tables (`lut`) are fitted by
plain k-means (rtn), by Hessian-diagonal-weighted k-means (squeezellm), or fitted plainly and then
rounded with GPTQ's error feedback (gptq).

    python benchmarks/formats.py                  # writes benchmarks/results/formats.{json,md}
    python benchmarks/formats.py --render         # rewrites the .md from the saved .json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_argument, embedded_model_protocol, machine_of  # noqa: E402  (benchmarks/ is a folder of scripts)
from weight_only_methods import quantize_copy  # noqa: E402

from lowbit.evaluate import ReferenceLogProbs, evaluate  # noqa: E402
from lowbit.recipes import Recipe  # noqa: E402

PER_CHANNEL_FP32 = dict(group_size=-1, scale_dtype="float32")
SCALAR_METHODS = ("rtn", "gptq")
TABLE_METHODS = ("rtn", "squeezellm", "gptq")
FORMATS: dict[str, tuple[dict, tuple[str, ...]]] = {  # label -> (recipe fields, methods that apply)
    "int4 asym g32": (dict(format="int", bits=4, symmetric=False, group_size=32), SCALAR_METHODS),
    "fp8 e4m3 per-channel": (dict(format="fp8_e4m3", bits=8, **PER_CHANNEL_FP32), SCALAR_METHODS),
    "fp8 e5m2 per-channel": (dict(format="fp8_e5m2", bits=8, **PER_CHANNEL_FP32), SCALAR_METHODS),
    "nvfp4": (dict(format="nvfp4", bits=4, group_size=16), SCALAR_METHODS),
    "mxfp4": (dict(format="mxfp4", bits=4, group_size=32), SCALAR_METHODS),
    "nf4 g64": (dict(format="nf4", bits=4, group_size=64), SCALAR_METHODS),
    "lut4 per-row (learned)": (dict(format="lut", bits=4, group_size=-1), TABLE_METHODS),
    "lut3 per-row (learned)": (dict(format="lut", bits=3, group_size=-1), TABLE_METHODS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of: {', '.join(FORMATS)}")
    parser.add_argument("--methods", default="rtn,gptq,squeezellm",
                        help="comma-separated; each format runs those of them that apply to it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "formats")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    add_device_argument(parser)
    args = parser.parse_args()
    unknown = [label for label in args.formats.split(",") if label not in FORMATS]
    if unknown:
        parser.error(f"unknown format {unknown[0]!r}; choose among: {', '.join(FORMATS)}")
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown_table(saved["meta"], saved["rows"]))
        return
    torch.manual_seed(0)

    protocol = embedded_model_protocol(args.samples, args.seq_len, args.eval_windows, args.device)
    loaded, original, calibration = protocol.loaded, protocol.original, protocol.calibration
    test_tokens, eval_kwargs, reference = protocol.test_tokens, protocol.eval_kwargs, protocol.reference
    rows = [{"format": "original (float32 weights)", "method": "original", "bits_per_weight": 16.0,
             "perplexity": reference.perplexity(), "kl": 0.0, "seconds": 0.0}]
    meta = describe_run(args, loaded, reference)
    for label in args.formats.split(","):
        fields, applicable = FORMATS[label]
        for method in (m for m in args.methods.split(",") if m in applicable):
            recipe = Recipe(method=method, **fields)
            model, seconds, bpw = quantize_copy(original, recipe, calibration, protocol.device)
            result = evaluate(model, test_tokens, reference=reference, **eval_kwargs)
            rows.append({"format": label, "method": method, "recipe": recipe.model_dump(), "bits_per_weight": bpw,
                         "perplexity": result.perplexity, "kl": result.kl, "seconds": seconds})
            print(f"{label} {method}: {bpw:.3f} bits, perplexity {result.perplexity:.3f}, KL {result.kl:.4f}, "
                  f"{seconds:.1f} s", flush=True)
            del model
            save(args, meta, rows)  # after every row, so a run cut short keeps its rows
    print(markdown_table(meta, rows))


def save(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown_table(meta, rows))


def describe_run(args: argparse.Namespace, loaded, reference: ReferenceLogProbs) -> dict:
    return {
        "model": loaded.name,
        "calibration": f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt, seed 0 "
        "(GPTQ and SqueezeLLM rows only; RTN uses no data)",
        "evaluation": f"first {len(reference.windows)} non-overlapping windows of 2048 tokens of wikitext-2 test.txt "
        f"({reference.scored_tokens} tokens scored)",
        "machine": machine_of(args.device),
        "command": "python benchmarks/formats.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render")),
    }


def markdown_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. Bits/weight: quantized linears (lm_head and "
        "embeddings excluded), every scale, table and per-tensor scale counted. Quantize times depend on what "
        "else the shared machine was running.",
        "",
        "| format | method | bits/weight | perplexity | KL to original | quantize time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        kl = "0 (itself)" if row["method"] == "original" else f"{row['kl']:.4f}"
        lines.append(f"| {row['format']} | {row['method']} | {row['bits_per_weight']:.3f} | "
                     f"{row['perplexity']:.3f} | {kl} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
