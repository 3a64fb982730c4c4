"""`lowbit plan` and the budget options of `lowbit quantize`: arguments, the plan table, the plan file."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lowbit.budget.candidates import DEFAULT_BITS, DEFAULT_GROUP_SIZES, candidate_grid
from lowbit.budget.evolve import EvolutionOptions
from lowbit.budget.plan import Budget, BudgetPlan, format_bytes, parse_size
from lowbit.budget.run import PlanOptions, plan_budget, sensitivity_for
from lowbit.budget.sensitivity import WEIGHTINGS
from lowbit.recipes.recipe import Recipe
from lowbit.solvers import SOLVERS


def _list(convert):
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def _group(value: str) -> int:
    return -1 if value == "channel" else int(value)


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """Options that turn `quantize` into a budgeted job (and that `plan` needs)."""
    g = parser.add_argument_group("mixed precision under a budget")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--target-bits", type=float, metavar="BITS",
                        help="choose bits and group size per layer for this average bits/weight over the "
                        "quantized layers (scales and zero points included)")
    budget.add_argument("--max-size", type=_size, metavar="SIZE",
                        help="choose per layer so that all tensors of the checkpoint fit in SIZE (e.g. 6GB, 80MB)")
    g.add_argument("--candidate-bits", type=_list(int), default=DEFAULT_BITS, metavar="B,B",
                   help=f"bit widths a layer may get (default {','.join(map(str, DEFAULT_BITS))})")
    g.add_argument("--candidate-groups", type=_list(_group), default=DEFAULT_GROUP_SIZES, metavar="G,G",
                   help="group sizes a layer may get; channel = -1 (default 32,64,channel)")
    g.add_argument("--candidate-methods", type=_list(str), metavar="M,M",
                   help=f"solvers a layer may get (default: the recipe's; registered: {', '.join(sorted(SOLVERS))})")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="fisher",
                   help="layer damage: output error weighted by loss gradients (fisher, default), unweighted "
                   "(hessian), weight error times Hutchinson's Hessian trace (trace, HAWQ-V2), or the measured "
                   "KL of quantizing that layer alone (kl: slowest, one forward pass per layer and candidate)")
    g.add_argument("--fisher-samples", type=int, default=8,
                   help="calibration windows that get the weighting's extra pass: gradients (fisher), trace "
                   "probes (trace) or KL scoring (kl) (default 8)")
    g.add_argument("--allocator", choices=("dp", "milp"), default="dp",
                   help="knapsack solver: dynamic programming (default) or scipy's integer program")
    g.add_argument("--evolve", type=int, default=0, metavar="GENERATIONS",
                   help="refine the plan by an evolutionary search scored by the measured KL of the assembled "
                   "model on calibration windows (EvoPress style); 0 = off (default). Each generation costs "
                   "about 6 + 2 x 4 forward passes of one calibration window")
    g.add_argument("--sensitivity-cache", type=Path, metavar="DIR",
                   help="where sensitivity tables are cached (default $LOWBIT_CACHE/sensitivity or ~/.cache/lowbit)")


def add_plan_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser("plan", help="choose bits per layer for a budget; print the plan and its size")
    p.add_argument("model", nargs="?", help="Hugging Face id, local folder or .gguf file (default: embedded model)")
    p.add_argument("--scheme", default="w4a16", help="base recipe: solver options, scale dtype, ignore list")
    p.add_argument("--recipe", type=Path, help="base recipe YAML file; replaces --scheme")
    p.add_argument("--method", choices=sorted(SOLVERS), help="solver of the candidates (default from the scheme)")
    p.add_argument("--damp", type=float, help="GPTQ: relative Hessian damping (default 0.01)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric candidates")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False,
                     help="candidates with zero points")
    p.add_argument("--calib", metavar="PATH_OR_DATASET", help="calibration text (.txt/.jsonl, wikitext2, c4, self)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--save-recipe", type=Path, metavar="FILE",
                   help="write the plan as a recipe; `lowbit quantize --recipe FILE` replays it")
    p.set_defaults(bits=None, group_size=None, act_order=False, clip_search=None,
                   eval_data=None, eval_seq_len=2048, eval_windows=None)
    add_budget_options(p)
    return p


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    if getattr(args, "target_bits", None) is not None:
        return Budget(target_bits=args.target_bits)
    if getattr(args, "max_size", None) is not None:
        return Budget(max_bytes=args.max_size)
    return None


def options_from_args(args: argparse.Namespace, base: Recipe) -> PlanOptions:
    methods = args.candidate_methods or (base.method,)
    for method in methods:
        if method not in SOLVERS:
            raise ValueError(f"unknown method {method!r} in --candidate-methods; available: {', '.join(sorted(SOLVERS))}")
    if args.fisher_samples < 0:
        raise ValueError("--fisher-samples must be >= 0")
    candidates = candidate_grid(methods, args.candidate_bits, args.candidate_groups, symmetric=base.symmetric)
    for candidate in candidates:
        candidate.format()  # reject impossible bit widths / group sizes before loading anything
    if args.evolve < 0:
        raise ValueError("--evolve must be >= 0 (generations; 0 = off)")
    evolution = EvolutionOptions(generations=args.evolve) if args.evolve else None
    return PlanOptions(tuple(candidates), args.weighting, args.fisher_samples, args.sensitivity_cache, args.allocator,
                       evolution)


def choose(args: argparse.Namespace, base: Recipe, budget: Budget, settings, console: Console) -> tuple[BudgetPlan, Recipe]:
    """Load the model, score the candidates (cached), allocate; print the plan. Returns it and its recipe."""
    from lowbit.api import resolve_device
    from lowbit.calibrate.data import resolve_calibration
    from lowbit.models.loading import load_model

    options = options_from_args(args, base)
    device = resolve_device(settings.device)  # before the model loads: a wrong --device fails at once
    loaded = load_model(args.model, settings.dtype)
    base = base.for_model_dtype(next(loaded.model.parameters()).dtype)  # the plan's costs in the scales it will store
    calibration, description = resolve_calibration(
        settings.calib, loaded.model, loaded.tokenizer, settings.samples, settings.seq_len, settings.seed
    )
    table = sensitivity_for(loaded.model, calibration, base, options, device)
    plan, recipe = plan_budget(loaded.model, table, base, budget, options, calibration, device)
    print_plan(plan, console, title=f"{loaded.name}: plan for {budget.describe()}")
    console.print(f"calibration: {description}; sensitivity table computed in {table.seconds:.1f} s "
                  "(cached: a repeated budget on this model and data is instant)")
    return plan, recipe


_BLOCK_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<layer>.+)$")


def short_label(candidate, methods: int) -> str:
    layout = "ch" if candidate.group_size == -1 else f"g{candidate.group_size}"
    text = f"{candidate.bits}b {layout}"
    return f"{candidate.method} {text}" if methods > 1 else text


def print_plan(plan: BudgetPlan, console: Console, title: str) -> None:
    """One row per block and one column per linear (falls back to one row per layer), then totals."""
    methods = len({c.candidate.method for c in plan.layers})
    parsed = [_BLOCK_NAME.match(c.name) for c in plan.layers]
    if all(parsed):
        columns = list(dict.fromkeys(m["layer"] for m in parsed))
        table = Table(title=title)
        table.add_column("block", justify="right")
        for column in columns:
            table.add_column(column.rsplit(".", 1)[-1])
        rows: dict[str, dict[str, str]] = {}
        for match, choice in zip(parsed, plan.layers):
            rows.setdefault(match["index"], {})[match["layer"]] = short_label(choice.candidate, methods)
        for index, cells in rows.items():
            table.add_row(index, *(cells.get(column, "-") for column in columns))
    else:
        table = Table(title=title)
        for name in ("layer", "shape", "choice", "bits/weight"):
            table.add_column(name)
        for choice in plan.layers:
            table.add_row(choice.name, "x".join(map(str, choice.shape)), short_label(choice.candidate, methods),
                          f"{choice.bits / (choice.shape[0] * choice.shape[1]):.3f}")
    console.print(table)
    counts = Counter(c.candidate for c in plan.layers)
    console.print("layers per choice: " + ", ".join(
        f"{c.label()} x{n}" for c, n in sorted(counts.items(), key=lambda item: -item[1])))
    console.print(
        f"predicted: {plan.bits_per_weight:.4f} bits/weight over {len(plan.layers)} quantized layers "
        f"({format_bytes(plan.linear_bits / 8)}), checkpoint tensors {format_bytes(plan.total_bytes)} "
        f"({format_bytes(plan.dense_bytes)} left unquantized); estimated damage {plan.damage:.4g} "
        f"({'nats/token, Fisher-weighted' if plan.weighting == 'fisher' else 'sum of layer output errors'})"
    )
    if plan.measured_kl is not None:
        console.print(f"evolutionary refinement: KL on its calibration windows {plan.measured_kl['start']:.4f} "
                      f"(knapsack plan) -> {plan.measured_kl['final']:.4f} "
                      f"({plan.measured_kl['evaluations']:.0f} evaluations)")


def plan_path(out_dir: Path) -> Path:
    """Where `lowbit quantize --target-bits/--max-size` saves the plan: beside the output folder."""
    return out_dir.parent / f"{out_dir.name}.plan.yaml"


def save_plan(recipe: Recipe, out_dir: Path, console: Console) -> None:
    """Write the plan beside the output folder before quantizing, so it survives a failed run."""
    path = plan_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe.save(path)
    console.print(f"plan saved to {path}; `lowbit quantize --recipe {path}` replays it")


def out_name(budget: Budget) -> str:
    if budget.target_bits is not None:
        return f"budget-{budget.target_bits:g}bpw"
    return f"budget-{budget.max_bytes / 1e6:.0f}MB"


def run_plan(args: argparse.Namespace, console: Console) -> None:
    from lowbit.cli import _settings, recipe_from_args

    budget = budget_from_args(args)
    if budget is None:
        raise ValueError("lowbit plan needs a budget: --target-bits BITS or --max-size SIZE")
    base = recipe_from_args(args)
    _, recipe = choose(args, base, budget, _settings(args), console)
    if args.save_recipe:
        recipe.save(args.save_recipe)
        console.print(f"wrote {args.save_recipe}; replay it with `lowbit quantize --recipe {args.save_recipe}`")
