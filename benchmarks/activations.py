"""Weight-and-activation quantization on SmolLM2-135M: W8A8 int8 (RTN, GPTQ, SmoothQuant + each),
FP8 dynamic and static, W4A8 / W4A4 with and without rotations, and W4A4 with an int4 KV cache.

Same protocol as benchmarks/weight_only_methods.py (whose quantize_copy this reuses): calibration =
random windows of ../shared/data/wikitext-2/valid.txt (for GPTQ, SmoothQuant and static FP8
scales), evaluation = the first --eval-windows non-overlapping 2048-token windows of test.txt,
perplexity and KL(original || quantized). Every row starts from the original weights, and its
evaluation runs the model with inputs rounded at run time (the hooks the pipeline attaches).
W4 rows use int4 symmetric with group 128 where it divides the layer (1536-wide down_proj) and 64
elsewhere (576 is not a multiple of 128). Without a rotation, W4A4's per-token int4 activations
are wrecked by outlier channels: the row shows why rotations are needed. The w4a4kv4-* rows add
QuaRot's int4 KV cache and are scored through it chunk by chunk (--kv-chunk tokens per step): on
a 2-core CPU about 80 s per 2048-token window at chunks of 512, far longer at the default 16.

    python benchmarks/activations.py                 # writes benchmarks/results/activations.{json,md}
    python benchmarks/activations.py --rows w8a8-rtn,fp8-dynamic --samples 8 --eval-windows 1   # smoke
    python benchmarks/activations.py --rows w4a4kv4-rtn,w4a4kv4-gptq,w4a4kv4-quarot-rtn,w4a4kv4-quarot-gptq \
        --device cuda --out benchmarks/results/activations_w4a4kv4
    python benchmarks/activations.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_device_argument, embedded_model_protocol, machine_of  # noqa: E402
from weight_only_methods import ROOT, quantize_copy  # noqa: E402

from lowbit.evaluate import ReferenceLogProbs, evaluate  # noqa: E402
from lowbit.evaluate.kv_protocol import DEFAULT_CHUNK, CacheScoring  # noqa: E402
from lowbit.formats.activation import ActivationFormat  # noqa: E402
from lowbit.kv import KVCacheSpec  # noqa: E402
from lowbit.recipes import Recipe, preset  # noqa: E402

INT8_TOKEN = ActivationFormat(bits=8)
INT4_TOKEN = ActivationFormat(bits=4)


def _w8a8(method: str, transforms: list[str]) -> Recipe:
    return preset("w8a8").model_copy(update={"method": method, "transforms": transforms})


ROWS: dict[str, Recipe] = {
    "w8a8-rtn": _w8a8("rtn", []),
    "w8a8-gptq": _w8a8("gptq", []),
    "w8a8-smoothquant-rtn": _w8a8("rtn", ["smoothquant"]),
    "w8a8-smoothquant-gptq": _w8a8("gptq", ["smoothquant"]),
    "fp8-dynamic": preset("fp8-dynamic"),
    "fp8-static": preset("fp8-static"),
    "w4a16-gptq": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto"),
    "w4a8-gptq": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto", activations=INT8_TOKEN),
    "w4a4-gptq": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto", activations=INT4_TOKEN),
    # W4A4 needs its activation outliers removed: rotations (QuaRot) or migration (SmoothQuant).
    "w4a4-rtn": Recipe(method="rtn", bits=4, symmetric=True, group_size="auto", activations=INT4_TOKEN),
    "w4a4-quarot-rtn": Recipe(method="rtn", bits=4, symmetric=True, group_size="auto", activations=INT4_TOKEN,
                              transforms=["quarot"]),
    "w4a4-quarot-gptq": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto", activations=INT4_TOKEN,
                               transforms=["quarot"]),
    "w4a4-smoothquant-gptq": Recipe(method="gptq", bits=4, symmetric=True, group_size="auto",
                                    activations=INT4_TOKEN, transforms=["smoothquant"]),
}
# W4A4 with an int4 KV cache (QuaRot's W4A4KV4), RTN vs GPTQ, each with and without the rotation;
# scored through the cache chunk by chunk (lowbit.evaluate.kv_protocol).
for _method in ("rtn", "gptq"):
    for _transforms in ([], ["quarot"]):
        ROWS["w4a4kv4-" + "".join(t + "-" for t in _transforms) + _method] = Recipe(
            method=_method, bits=4, symmetric=True, group_size="auto", activations=INT4_TOKEN,
            transforms=_transforms, kv_cache=KVCacheSpec(bits=4))
"""Also the run order: cheap rows first, so a run cut short still has them."""


def activation_label(recipe: Recipe) -> str:
    fmt = recipe.activations
    if fmt is None:
        return "16 (none)"
    number = "fp8" if fmt.type == "fp8_e4m3" else f"int{fmt.bits}"
    return f"{fmt.bits} ({number} {'dynamic per-token' if fmt.dynamic else 'static per-tensor'})"


def kv_label(recipe: Recipe, chunk: int) -> str:
    spec = recipe.kv_cache
    if spec is None:
        return "16 (none)"
    return f"int{spec.bits} g{spec.group_size}, {spec.residual} recent exact (chunks of {chunk})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--kv-chunk", type=int, default=DEFAULT_CHUNK,
                        help="rows with a KV cache: tokens fed per step through the cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "activations")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        save(args.out, saved["meta"], saved["rows"])
        return
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; available: {', '.join(ROWS)}")
    protocol = embedded_model_protocol(args.samples, args.seq_len, args.eval_windows, args.device)
    loaded, original, calibration = protocol.loaded, protocol.original, protocol.calibration
    test_tokens, eval_kwargs, reference = protocol.test_tokens, protocol.eval_kwargs, protocol.reference
    rows: list[dict] = []
    meta: dict = {}
    cache_reference: ReferenceLogProbs | None = None  # the original through a full-precision cache
    for label in args.rows.split(","):
        recipe = ROWS[label]
        model, seconds, bpw = quantize_copy(original, recipe, calibration, protocol.device)
        if recipe.kv_cache is None:
            result = evaluate(model, test_tokens, reference=reference, **eval_kwargs)
        else:
            scoring = CacheScoring(recipe.kv_cache, args.kv_chunk)
            cache_reference = cache_reference or protocol.reference_through(scoring.full_precision())
            result = evaluate(model, test_tokens, reference=cache_reference, kv_cache=scoring, **eval_kwargs)
        if not rows:
            rows.append({"label": "original", "recipe": "float32", "bits_per_weight": 16.0, "activations": "16 (none)",
                         "perplexity": result.reference_perplexity, "kl": 0.0, "seconds": 0.0})
            meta = describe_run(args, loaded.name, result)
        rows.append({"label": label, "recipe": recipe.describe(), "bits_per_weight": bpw,
                     "activations": activation_label(recipe), "kv_cache": kv_label(recipe, args.kv_chunk),
                     "perplexity": result.perplexity, "kl": result.kl, "seconds": seconds})
        print(f"{label}: {recipe.describe()}: perplexity {result.perplexity:.3f}, KL {result.kl:.4f}, "
              f"{bpw:.3f} bits/weight, {seconds:.1f} s", flush=True)
        del model
        save(args.out, meta, rows)  # after every row, so a run cut short keeps its rows
    print(markdown_table(meta, rows))


def describe_run(args: argparse.Namespace, model_name: str, result) -> dict:
    return {
        "model": model_name,
        "calibration": f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt, seed 0 "
        "(GPTQ, SmoothQuant and static FP8 scales; RTN and dynamic rows use no data)",
        "evaluation": f"first {result.windows} non-overlapping windows of 2048 tokens of wikitext-2 test.txt "
        f"({result.tokens} tokens scored)",
        "machine": machine_of(args.device),
        "command": "python benchmarks/activations.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render")),
    }


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown_table(meta, rows))


def markdown_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}.",
        f"Machine: {meta.get('machine', 'not recorded')}. Command: `{meta['command']}`. Activations are rounded "
        "at run time in evaluation (fake quantization); rows with a KV cache are scored chunk by chunk through "
        "it, their KL against the original fed the same chunks through a full-precision cache.",
        "",
        "| row | recipe | weight bits/weight | activation bits | KV cache | perplexity | KL to original | quantize time (s) |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for row in rows:
        kl = "0 (itself)" if row["label"] == "original" else f"{row['kl']:.4f}"
        lines.append(f"| {row['label']} | {row['recipe']} | {row['bits_per_weight']:.3f} | {row['activations']} | "
                     f"{row.get('kv_cache', '16 (none)')} | {row['perplexity']:.3f} | {kl} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
