"""Weight-only methods on SmolLM2-135M: RTN, HQQ, EasyQuant, AWQ, GPTQ and AWQ+GPTQ side by side.

Same protocol as benchmarks/foundation.py: calibration = random windows of
../shared/data/wikitext-2/valid.txt (used only by the methods that need data: awq, gptq,
awq+gptq); evaluation = the first --eval-windows non-overlapping 2048-token windows of test.txt,
perplexity and KL(original || quantized). Every row starts from the same original weights.
Group size 128 does not divide SmolLM2's width 576, so the settings are w4 asym g64, w3 asym g64
and w4 asym per channel. Bits per weight include scales, zero points and (EasyQuant) the sparse
outliers.

    python benchmarks/weight_only_methods.py     # writes benchmarks/results/weight_only_methods.{json,md}
    python benchmarks/weight_only_methods.py --render
    python benchmarks/weight_only_methods.py --merge benchmarks/results/OTHER.json   # add a second run's rows
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lowbit.evaluate import evaluate
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe
from lowbit.recipes.presets import GPTQ_RANGES
from lowbit.transforms.model import apply_model_transforms

from common import add_device_argument, embedded_model_protocol, machine_of

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "4:64,3:64,4:-1"
METHODS = "rtn,awq,hqq,gptq,easyquant,awq+gptq"
"""Also the run order: every setting of a method before the next method, so that a run cut short
(each GPTQ row takes many minutes on a shared CPU) still has the cheap rows of every setting."""


SOLVER_VARIANTS = {
    "gptq-static": ("gptq", {"static_groups": True}),
    "gptq-static-mse": ("gptq", GPTQ_RANGES),
}
"""Row names for solver options: plain `gptq` is the paper's (groups fitted when reached, min/max);
the integer schemes (`--scheme w4a16`...) use gptq-static-mse."""


def recipe_for(method: str, bits: int, group_size: int, transform_options: dict | None = None) -> Recipe:
    """'a+b' is transform a before solver b (a model transform such as hadamard too); a plain name is a
    method (with what it implies) or a SOLVER_VARIANTS name. `transform_options` gives settings to the
    transforms it names."""
    *transforms, solver = method.split("+")
    solver, solver_options = SOLVER_VARIANTS.get(solver, (solver, {}))
    options = {name: value for name, value in (transform_options or {}).items() if name in transforms}
    return Recipe(method=solver, transforms=transforms, bits=bits, symmetric=False, group_size=group_size,
                  transform_options=options, method_options=solver_options)


def quantize_copy(original, recipe: Recipe, calibration, device: torch.device = torch.device("cpu"),
                  quantize_head: bool = False) -> tuple[torch.nn.Module, float, float]:
    """A quantized copy of `original`, made on `device`; returns it with its seconds and average bits
    per weight. `quantize_head`: lm_head too, where the recipe does not ignore it."""
    model = copy.deepcopy(original).to(device)
    bits = count = 0

    def on_quantized(name, qweight):
        nonlocal bits, count
        bits += qweight.bits_per_weight() * qweight.weight_count
        count += qweight.weight_count

    start = time.perf_counter()
    data = calibration if recipe.needs_calibration() else None
    apply_model_transforms(recipe.model_transforms(), model, architecture_of(model), recipe.layer_formats(), data)
    SequentialQuantizer(
        model, architecture_of(model), recipe.plan(), on_quantized=on_quantized, transforms=recipe.block_transforms(),
        activations=recipe.activations, device=device, activations_on_device=device.type == "cuda",
        quantize_head=quantize_head,
    ).run(data)
    return model, time.perf_counter() - start, bits / count


def build_parser(description: str, settings: str, methods: str, out: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--settings", default=settings, help="comma-separated bits:group_size (-1 = per channel)")
    parser.add_argument("--methods", default=methods, help="comma-separated; 'awq+gptq' = AWQ transform, then GPTQ")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    add_device_argument(parser)
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="add the rows of other saved runs (same model, calibration and evaluation) to --out")
    return parser


def main() -> None:
    args = build_parser(__doc__.splitlines()[0], SETTINGS, METHODS,
                        ROOT / "benchmarks" / "results" / "weight_only_methods").parse_args()
    run(args, METHODS.split(","), "weight_only_methods.py",
        "awq, gptq and awq+gptq only; rtn, hqq and easyquant use no data")


def run(args: argparse.Namespace, order: list[str], script: str, data_users: str) -> None:
    """Quantize and score one row per (method, setting) of `args`; rows saved after each, in `order`."""
    if args.render or args.merge:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        for path in args.merge or []:
            saved = merged(saved, json.loads(path.read_text()), path)
        save(args, saved["meta"], saved["rows"], order)
        return
    torch.manual_seed(0)

    protocol = embedded_model_protocol(args.samples, args.seq_len, args.eval_windows, args.device)
    loaded, original, calibration = protocol.loaded, protocol.original, protocol.calibration
    test_tokens, eval_kwargs, reference = protocol.test_tokens, protocol.eval_kwargs, protocol.reference
    settings = [tuple(map(int, setting.split(":"))) for setting in args.settings.split(",")]
    rows: list[dict] = []
    meta: dict = {}
    for method in args.methods.split(","):
        for bits, group_size in settings:
            recipe = recipe_for(method, bits, group_size, getattr(args, "transform_options", None))
            model, seconds, bpw = quantize_copy(original, recipe, calibration, protocol.device)
            result = evaluate(model, test_tokens, reference=reference, **eval_kwargs)
            if not rows:  # the original's perplexity comes with the KL pass over its log-probabilities
                rows.append({"method": "original", "bits": 16, "group_size": None, "bits_per_weight": 16.0,
                             "perplexity": result.reference_perplexity, "kl": 0.0, "seconds": 0.0})
                meta = describe_run(args, loaded, result, script, data_users)
            rows.append({"method": method, "bits": bits, "group_size": group_size, "bits_per_weight": bpw,
                         "perplexity": result.perplexity, "kl": result.kl, "seconds": seconds})
            print(f"{recipe.describe()}: perplexity {result.perplexity:.3f}, KL {result.kl:.4f}, "
                  f"{bpw:.3f} bits/weight, {seconds:.1f} s", flush=True)
            del model
            save(args, meta, rows, order)  # after every row, so a long run that is cut short keeps its rows
    print(markdown_table(meta, table_order(rows, order)))


def merged(saved: dict, other: dict, path: Path) -> dict:
    """Rows of two runs of one protocol in one table, each row tagged with its machine."""
    for key in ("model", "calibration", "evaluation"):
        if saved["meta"][key] != other["meta"][key]:
            raise SystemExit(f"{path}: its {key} differs from the saved run's; rows would not be comparable")
    rows = tagged(saved) + [row for row in tagged(other) if row["method"] != "original"]
    commands = [*saved["meta"]["command"].split("`; `"), other["meta"]["command"]]
    machines = [*saved["meta"]["machine"].split("; "), other["meta"]["machine"]]
    meta = {**saved["meta"], "command": "`; `".join(dict.fromkeys(commands)),  # shown as `A`; `B`
            "machine": "; ".join(dict.fromkeys(machines))}
    return {"meta": meta, "rows": rows}


def tagged(run: dict) -> list[dict]:
    """The rows of a saved run, each naming the machine it was measured on (rows merged earlier keep theirs)."""
    return [{"machine": run["meta"]["machine"], **row} for row in run["rows"]]


def table_order(rows: list[dict], methods: list[str] | None = None) -> list[dict]:
    """The original first, then settings in order of appearance, methods in `methods` order (default
    METHODS; others, such as solver variants, after them in order of appearance)."""
    settings = list(dict.fromkeys((row["bits"], row["group_size"]) for row in rows if row["method"] != "original"))
    methods = methods or METHODS.split(",")

    methods = methods + [m for m in dict.fromkeys(row["method"] for row in rows) if m not in methods and m != "original"]

    def order(row: dict) -> tuple[int, int]:
        if row["method"] == "original":
            return (-1, -1)
        return (settings.index((row["bits"], row["group_size"])), methods.index(row["method"]))

    return sorted(rows, key=order)


def save(args: argparse.Namespace, meta: dict, rows: list[dict], methods: list[str] | None = None) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = table_order(rows, methods)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown_table(meta, rows))


def describe_run(args: argparse.Namespace, loaded, result, script: str, data_users: str) -> dict:
    return {
        "model": loaded.name,
        "calibration": f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt, seed 0 "
        f"({data_users})",
        "evaluation": f"first {result.windows} non-overlapping windows of 2048 tokens of wikitext-2 test.txt "
        f"({result.tokens} tokens scored)",
        "machine": machine_of(args.device),
        "command": f"python benchmarks/{script} " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render", "merge", "transform_options")),
    }


def markdown_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. Quantize times come from a shared, busy "
        "machine: they say which methods take seconds and which take minutes, nothing finer.",
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
