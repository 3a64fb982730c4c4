"""Mixed precision under a budget on SmolLM2-135M: best uniform setting vs the knapsack plan.

For each target (bits per weight over the quantized linears, scales and zero points included) the
sensitivity table (GPTQ on the float Hessians of every candidate, weighted by output gradients)
is computed once and cached, the DP chooses a plan, and the plan is quantized with GPTQ through
`lowbit.api.quantize`, exported, and its size measured from the saved safetensors. Uniform rows
quantize every layer with one candidate. Perplexity: the first --eval-windows non-overlapping
2048-token windows of WikiText-2 test.txt; calibration: random windows of valid.txt (seed 0).

    python benchmarks/budget.py                # writes benchmarks/results/budget.{json,md}
    python benchmarks/budget.py --method rtn --samples 8 --fisher-samples 4 --eval-windows 2 \
        --out benchmarks/results/budget_rtn_quick   # the same comparison with RTN, small enough for a busy CPU
    python benchmarks/budget.py --render       # rewrites the .md table from the saved .json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowbit.api import Settings, quantize, resolve_device
from lowbit.budget.candidates import candidate_grid
from lowbit.budget.evolve import EvolutionOptions
from lowbit.budget.plan import Budget
from lowbit.budget.run import PlanOptions, plan_budget, sensitivity_for
from lowbit.budget.size import saved_size
from lowbit.calibrate.data import calibration_windows, load_text, tokenize_text
from lowbit.compare.pareto import pareto_front
from lowbit.compare.plot import plot_pareto
from lowbit.evaluate import ReferenceLogProbs, evaluate
from lowbit.models.loading import load_model
from lowbit.recipes import Recipe
from lowbit.recipes.presets import GPTQ_RANGES

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
JOBS = ",".join([  # the proof's targets first (3.0, 3.5), each next to its uniform neighbours
    "uniform=3:-1", "plan=fisher:3.0", "plan=fisher+evo:3.0", "uniform=3:64", "plan=fisher:3.5",
    "plan=fisher+evo:3.5", "uniform=3:32", "uniform=2:32", "plan=fisher:2.5", "plan=fisher+evo:2.5",
    "uniform=4:64", "plan=fisher:4.25", "plan=fisher+evo:4.25", "uniform=4:-1", "uniform=2:64", "uniform=4:32",
])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--jobs", default=JOBS, help="rows in the order they run: uniform=BITS:GROUP "
                        "(-1 = per channel) or plan=WEIGHTING:TARGET_BITS (WEIGHTING+evo: refined by measured KL)")
    parser.add_argument("--bits", default="2,3,4,8", help="candidate bit widths of the plans")
    parser.add_argument("--groups", default="32,64,-1", help="candidate group sizes of the plans")
    parser.add_argument("--fisher-samples", type=int, default=8)
    parser.add_argument("--generations", type=int, default=EvolutionOptions.generations,
                        help="generations of the evolutionary refinement (jobs plan=WEIGHTING+evo:TARGET)")
    parser.add_argument("--paper-gptq", action="store_true",
                        help="GPTQ as in the paper (ranges fitted when reached, min/max) instead of the schemes'")
    parser.add_argument("--method", default="gptq", help="solver of every row and candidate (gptq or rtn)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", help="model source (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-budget-cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "budget")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="with --render: add the rows of other runs of this script (same model, data and "
                        "candidates, other --jobs) to the saved .json first")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        for path in args.merge:
            merge(saved, json.loads(path.read_text()))
        save(args.out, saved)
        return
    device = resolve_device(args.device)
    loaded = load_model(args.model)
    original, tokenizer = loaded.model, loaded.tokenizer
    calib_path = str(args.data / "valid.txt")
    calibration = calibration_windows(tokenizer, load_text(calib_path), args.samples, args.seq_len, seed=0)
    test_tokens = tokenize_text(tokenizer, load_text(str(args.data / "test.txt")))
    eval_kwargs = dict(seq_len=args.eval_seq_len, max_windows=args.eval_windows)
    original.to(device)
    reference = ReferenceLogProbs(original, test_tokens, **eval_kwargs)
    original.to("cpu")
    base = reference.perplexity()
    settings = Settings(calib=calib_path, samples=args.samples, seq_len=args.seq_len, seed=0, device=args.device)
    result = {"meta": describe(args, loaded, reference, device), "original": {"perplexity": base},
              "uniform": [], "plans": [], "sensitivity": {}}
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else None
    if previous is not None and previous["meta"]["command"] == result["meta"]["command"]:
        result.update(uniform=previous["uniform"], plans=previous["plans"])  # resume a cut-short run
    done_uniform = {(r["bits"], r["group_size"]) for r in result["uniform"]}
    done_plans = {(r["target"], r["weighting"]) for r in result["plans"]}
    print(f"original: perplexity {base:.3f}", flush=True)

    def run(recipe: Recipe, export: bool) -> dict:
        out = Path(tempfile.mkdtemp(prefix="lowbit-budget-")) / "model" if export else None
        start = time.perf_counter()
        report = quantize(args.model, recipe, out, settings, evaluate_result=False)
        seconds = time.perf_counter() - start
        scores = evaluate(report.quantized_model, test_tokens, reference=reference, device=device, **eval_kwargs)
        row = {"bits_per_weight": report.linear_size.bits_per_weight, "perplexity": scores.perplexity,
               "kl": scores.kl, "seconds": seconds}
        if out is not None:
            size = saved_size(out)
            row.update(saved_bits_per_weight=size.bits_per_weight, saved_tensor_bytes=size.tensor_bytes,
                       export_max_abs_diff=report.export_max_abs_diff)
            shutil.rmtree(out.parent)
        return row

    # The integer schemes' GPTQ (ranges on the original weights, MSE clipping) unless --paper-gptq.
    method_options = dict(GPTQ_RANGES) if args.method == "gptq" and not args.paper_gptq else {}
    candidates = candidate_grid((args.method,), tuple(map(int, args.bits.split(","))),
                                tuple(map(int, args.groups.split(","))), symmetric=False)
    base_recipe = Recipe(method=args.method, symmetric=False, method_options=method_options)
    tables = {}
    for job in args.jobs.split(","):
        kind, _, spec = job.partition("=")
        if kind == "uniform":
            bits, group = map(int, spec.split(":"))
            if (bits, group) in done_uniform:
                continue
            recipe = Recipe(method=args.method, bits=bits, symmetric=False, group_size=group,
                            method_options=method_options)
            row = {"bits": bits, "group_size": group, **run(recipe, export=False)}
            result["uniform"].append(row)
            print(f"uniform {recipe.describe()}: {row['bits_per_weight']:.3f} bits/weight, "
                  f"perplexity {row['perplexity']:.3f}", flush=True)
        else:
            label, _, target_text = spec.partition(":")
            target = float(target_text)
            if (target, label) in done_plans:
                continue
            weighting = label.removesuffix("+evo")  # "fisher+evo": the DP plan refined by measured KL
            evolution = EvolutionOptions(generations=args.generations) if label.endswith("+evo") else None
            options = PlanOptions(tuple(candidates), weighting, args.fisher_samples, args.cache, evolution=evolution)
            if weighting not in tables:
                tables[weighting] = sensitivity_for(original, calibration, base_recipe, options, device)
                result["sensitivity"][weighting] = {"seconds": tables[weighting].seconds}
            start = time.perf_counter()
            plan, recipe = plan_budget(original, tables[weighting], base_recipe, Budget(target_bits=target), options,
                                       calibration, device)
            row = {"target": target, "weighting": label, "predicted_bits_per_weight": plan.bits_per_weight,
                   "predicted_damage": plan.damage, "plan": {c.name: c.candidate.key for c in plan.layers},
                   "plan_seconds": time.perf_counter() - start, "measured_kl": plan.measured_kl,
                   **run(recipe, export=True)}
            result["plans"].append(row)
            print(f"plan {target} ({label}): {row['saved_bits_per_weight']:.4f} bits/weight saved, "
                  f"perplexity {row['perplexity']:.3f}", flush=True)
        save(args.out, result)  # after every row, so a run that is cut short keeps what it finished
    print(markdown(result))


def merge(result: dict, other: dict) -> None:
    """Add `other`'s rows that `result` lacks; refuse runs that differ in anything but their jobs."""
    def setup(meta: dict) -> dict:
        return {k: v for k, v in meta.items() if k != "command" and k != "other_commands"}

    if setup(result["meta"]) != setup(other["meta"]) or result["original"] != other["original"]:
        raise SystemExit("cannot merge runs with different model, data, candidates or machine")
    have_uniform = {(r["bits"], r["group_size"]) for r in result["uniform"]}
    have_plans = {(r["target"], r["weighting"]) for r in result["plans"]}
    result["uniform"] += [r for r in other["uniform"] if (r["bits"], r["group_size"]) not in have_uniform]
    result["plans"] += [r for r in other["plans"] if (r["target"], r["weighting"]) not in have_plans]
    result["meta"].setdefault("other_commands", []).append(other["meta"]["command"])


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(out.with_suffix(".png"), result)


def plot(path: Path, result: dict) -> None:
    """Perplexity and KL against bits per weight: uniform settings, DP plans, DP + evolution."""
    rows = [{"method": "uniform", "label": f"int{r['bits']} {_layout(r['group_size'])}", **r}
            for r in result["uniform"]]
    rows += [{"method": "DP + evolution" if r["weighting"].endswith("+evo") else "DP",
              "label": f"{r['target']:g}", **r, "bits_per_weight": r["saved_bits_per_weight"]}
             for r in result["plans"]]
    for metric in ("perplexity", "kl"):
        front = set(pareto_front([(r["bits_per_weight"], r[metric]) for r in rows]))
        for index, row in enumerate(rows):
            row[f"pareto_{metric}"] = index in front
    plot_pareto([{**r, "status": "ok"} for r in rows], result["original"], path,
                f"SmolLM2-135M under a budget ({result['meta']['evaluation']})")


def describe(args: argparse.Namespace, loaded, reference: ReferenceLogProbs, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "model": loaded.name,
        "calibration": f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt, seed 0",
        "evaluation": f"first {len(reference.windows)} non-overlapping windows of {args.eval_seq_len} tokens of "
        f"wikitext-2 test.txt ({sum(w.numel() - 1 for w in reference.windows)} tokens scored)",
        "candidates": f"{args.method} int{{{args.bits}}} asym, groups {{{args.groups}}} (-1 = per channel), fp16 scales"
        + (" (GPTQ ranges fitted on the original weights with MSE clipping)" if args.method == "gptq"
           and not args.paper_gptq else ""),
        "machine": f"{name}, torch {torch.__version__}",
        "command": "python benchmarks/budget.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render", "merge", "cache", "data", "model")),
    }


def _layout(group: int) -> str:
    return "per-channel" if group == -1 else f"g{group}"


def markdown(result: dict) -> str:
    meta, base = result["meta"], result["original"]["perplexity"]
    uniform = sorted(result["uniform"], key=lambda r: r["bits_per_weight"])
    lines = [
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: {meta['evaluation']}. "
        f"Plan candidates: {meta['candidates']}. Machine: {meta['machine']}. Command: `{meta['command']}`"
        + "".join(f", then `{c}` (rows merged with --render --merge)" for c in meta.get("other_commands", []))
        + ".",
        "",
        f"Original perplexity: {base:.3f}. Bits per weight are over the quantized linears (scales and zero "
        "points included); for plans they are measured from the saved safetensors files.",
        "",
        f"### Uniform {meta['candidates'].split()[0]} (asymmetric)",
        "",
        "| setting | bits/weight | perplexity | KL to original |",
        "|---|---:|---:|---:|",
    ]
    for row in uniform:
        lines.append(f"| int{row['bits']} {_layout(row['group_size'])} | {row['bits_per_weight']:.3f} | "
                     f"{row['perplexity']:.3f} | {row['kl']:.4f} |")
    lines += [
        "",
        "### Budgeted plans (DP) vs uniform",
        "",
        "Baselines: the next uniform setting at or above the plan's size (uniform rounded up to the "
        "nearest size it offers), and the best uniform setting within the budget. Reduction: "
        "1 - (plan perplexity - original) / (uniform perplexity - original).",
        "",
        "| target | weighting | predicted bits/weight | saved bits/weight | within 1% | perplexity | KL | "
        "next uniform up (bits/weight: ppl) | reduction vs it | best uniform within budget | reduction vs it |",
        "|---:|---|---:|---:|---|---:|---:|---|---:|---|---:|",
    ]
    for row in sorted(result["plans"], key=lambda r: (r["target"], r["weighting"])):
        saved = row["saved_bits_per_weight"]
        up = [u for u in uniform if u["bits_per_weight"] >= saved]
        within_budget = [u for u in uniform if u["bits_per_weight"] <= row["target"]]
        cells = []
        for pick in (up[0] if up else None,
                     min(within_budget, key=lambda u: u["perplexity"]) if within_budget else None):
            if pick is None:
                cells += ["none run", "-"]
                continue
            cells += [f"int{pick['bits']} {_layout(pick['group_size'])} ({pick['bits_per_weight']:.3f}: "
                      f"{pick['perplexity']:.3f})",
                      f"{1 - (row['perplexity'] - base) / (pick['perplexity'] - base):.0%}"]
        within = abs(saved - row["target"]) <= 0.01 * row["target"]
        lines.append(f"| {row['target']:g} | {row['weighting']} | {row['predicted_bits_per_weight']:.4f} | "
                     f"{saved:.4f} | {'yes' if within else 'no'} | {row['perplexity']:.3f} | {row['kl']:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
