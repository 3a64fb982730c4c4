"""`lowbit quantize | plan | eval | generate | compare | bench`: the command line. Parsing and printing only; the work is in lowbit.api."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
import yaml

from lowbit import __version__
from lowbit.budget import command as budget_command
from lowbit.compare import command as compare_command
from lowbit.formats.activation import ACTIVATION_SPEC_HELP, parse_activations
from lowbit.formats.families import FAMILIES
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR
from lowbit.evaluate.kv_protocol import DEFAULT_CHUNK as DEFAULT_KV_CHUNK
from lowbit.kernels.w4a16 import PATHS as W4A16_PATHS
from lowbit.kv.spec import KV_CACHE_NAMES, ROW_KINDS, KVCacheSpec, spec_of_name
from lowbit.recipes import PRESETS, Recipe, RecipeError, preset
from lowbit.solvers import SOLVERS
from lowbit.transforms import MODEL_TRANSFORMS, TRANSFORMS

console = Console(soft_wrap=True)


def _group_size(value: str) -> int | str:
    named = {"auto": "auto", "channel": PER_CHANNEL, "tensor": PER_TENSOR}
    if value in named:
        return named[value]
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, auto, channel or tensor: {value!r}") from None


def _windows(value: str) -> int | None:
    if value == "all":
        return None
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("windows must be at least 1 (or 'all')")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype to load the model in (default: the checkpoint's; GGUF: float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampled windows and generated text")


def _add_eval_options(parser: argparse.ArgumentParser, data_flag: str, seq_flag: str, windows_default: str) -> None:
    parser.add_argument(data_flag, dest="eval_data", metavar="PATH_OR_DATASET",
                        help="evaluation text: a .txt/.jsonl file, or wikitext2 / c4 where the hub is "
                        "reachable (default: wikitext2 test, else text sampled from the model)")
    parser.add_argument(seq_flag, dest="eval_seq_len", type=_positive, default=2048,
                        help="tokens per evaluation window; windows do not overlap (default 2048)")
    parser.add_argument("--windows", dest="eval_windows", type=_windows, default=windows_default,
                        help=f"evaluate on the first N windows, or 'all' (default {windows_default})")


def _transform_option(text: str) -> tuple[str, str, object]:
    """NAME.KEY=VALUE -> (NAME, KEY, VALUE read as YAML: 32 is a number, false a boolean)."""
    target, separator, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not (separator and dot and name and key):
        raise argparse.ArgumentTypeError(f"expected NAME.KEY=VALUE (e.g. spinquant.steps=32), got {text!r}")
    try:
        return name, key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}") from None
def _add_kv_options(parser: argparse.ArgumentParser, evaluating: bool) -> None:
    kv = parser.add_argument_group("quantized KV cache (lowbit.kv)")
    width = kv.add_mutually_exclusive_group()
    names = [*KV_CACHE_NAMES, *ROW_KINDS, *(["none"] if evaluating else [])]
    stored = "evaluate through" if evaluating else "store in the export's recipe (and evaluate through)"
    width.add_argument("--kv-cache", choices=names,
                       help=f"{stored} a quantized KV cache: intN keys per channel and values per token, "
                       "asymmetric; int8-token (symmetric int8) or fp8 (e4m3) with a scale per token and head, the "
                       "caches `lowbit generate` decodes with"
                       + ("; none: ignore the cache an export names" if evaluating else ""))
    width.add_argument("--kv-bits", type=int, choices=sorted(KV_CACHE_NAMES.values()), help="same as --kv-cache intN")
    kv.add_argument("--kv-group", type=_positive, help="KV group size: tokens per key group, channels per value "
                    "group (capped at the head dimension) (default 64)")
    kv.add_argument("--kv-residual", type=int, help="most recent tokens kept in full precision (default 128)")
    kv.add_argument("--kv-pre-rope", action="store_true", help="quantize keys before the rotary embedding (KVQuant)")
    kv.add_argument("--kv-chunk", type=_positive, default=DEFAULT_KV_CHUNK,
                    help=f"evaluation through the cache: tokens per forward pass, each attending to earlier "
                    f"chunks through the cache (1 = token by token; default {DEFAULT_KV_CHUNK})")


_KV_DETAIL_FLAGS = {"group_size": "--kv-group", "residual": "--kv-residual", "pre_rope": "--kv-pre-rope"}


def kv_cache_from_args(args: argparse.Namespace) -> KVCacheSpec | str | None:
    """The KVCacheSpec the flags ask for, "none", or None when no --kv-cache / --kv-bits was given."""
    name = args.kv_cache or (f"int{args.kv_bits}" if args.kv_bits else None)
    details = {"group_size": args.kv_group, "residual": args.kv_residual, "pre_rope": args.kv_pre_rope or None}
    given = {key: value for key, value in details.items() if value is not None}
    if name is None or name == "none":
        if given:
            raise RecipeError(f"{_KV_DETAIL_FLAGS[next(iter(given))]} needs --kv-cache intN (or --kv-bits N)")
        return name
    try:
        return spec_of_name(name, **given)
    except ValidationError as err:
        raise RecipeError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training quantization of LLMs.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a model and export it (compressed-tensors)")
    q.add_argument("model", nargs="?", help="Hugging Face id, local folder or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    q.add_argument("--scheme", default="w4a16", choices=sorted(PRESETS), help="starting recipe (default w4a16)")
    q.add_argument("--recipe", type=Path, help="recipe YAML file; replaces --scheme")
    q.add_argument("--method", choices=sorted(SOLVERS), help="solver (default from the scheme: gptq)")
    q.add_argument("--format", choices=list(FAMILIES),
                   help="number format (default from the scheme: int); naming one also takes its default bits, "
                   "group size and symmetry unless --bits / --group-size / --asym say otherwise: "
                   + "; ".join(f"{name}: {family.help}" for name, family in FAMILIES.items()))
    q.add_argument("--transform", dest="transforms", action="append",
                   choices=sorted([*TRANSFORMS, *MODEL_TRANSFORMS]),
                   help="function-preserving rewrite before solving (repeatable): awq rescales each block "
                   "(--transform awq --method gptq); hadamard / quarot / spinquant rotate the whole model first")
    q.add_argument("--transform-option", dest="transform_options", action="append", type=_transform_option,
                   metavar="NAME.KEY=VALUE", help="a transform's setting (repeatable), e.g. spinquant.steps=32")
    q.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}", help="bits per weight code")
    q.add_argument("--activations", metavar="SPEC",
                   help="round every quantized layer's input at run time (default from the scheme: none): "
                   + ACTIVATION_SPEC_HELP)
    q.add_argument("--group-size", type=_group_size,
                   help="columns per scale: N, channel (or -1), tensor (or 0), or auto = largest of 128/64/32 "
                   "dividing each layer")
    q.add_argument("--scale-dtype", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype scales are stored in (default from the scheme: auto = the model's dtype where it is "
                   "float16 or bfloat16, the dtype engines load scales in; else float16)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric grid")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False, help="grid with zero points")
    q.add_argument("--codebook-bits", type=int, choices=range(2, 17), metavar="{2..16}",
                   help="vq: log2 of the codebook size (sets bits; default 8)")
    q.add_argument("--vq-dim", type=int, choices=range(2, 9), metavar="{2..8}",
                   help="vq: consecutive input weights per codebook index (default 4)")
    q.add_argument("--residual-bits", type=int, choices=range(2, 17), metavar="{2..16}",
                   help="vq: add a second (residual) codebook of 2^N entries")
    q.add_argument("--row-scale", action="store_true", help="vq: normalise each row by its RMS before VQ")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups, so it exports)")
    q.add_argument("--damp", type=float, help="GPTQ: relative Hessian damping (default 0.01)")
    clip = q.add_mutually_exclusive_group()
    clip.add_argument("--clip-search", dest="clip_search", action="store_const", const=True,
                      help="MSE search of each group's clipping range (GPTQ: on by default)")
    clip.add_argument("--no-clip-search", dest="clip_search", action="store_const", const=False,
                      help="GPTQ: plain min/max ranges")
    q.add_argument("--dynamic-groups", action="store_true",
                   help="GPTQ: fit each group's range when the column loop reaches it, on the error-updated "
                   "weights, as the paper does (default: fitted up front on the original weights)")
    q.add_argument("--outliers", type=float, metavar="FRACTION",
                   help="keep this fraction of each matrix's weights (e.g. 0.005) in fp16 as a sparse matrix and "
                   "quantize the rest with --method (dense-and-sparse; exported in lowbit's layout)")
    q.add_argument("--outlier-criterion", choices=["hessian", "magnitude"],
                   help="rank outliers by w^2/[H^-1]_jj (hessian, default; needs calibration) or by |w|")
    q.add_argument("--eora-rank", type=int, metavar="R",
                   help="add a rank-R EoRA correction of the quantization error, fitted on the calibration "
                   "Hessian (any method; fp16 side branch, exported in lowbit's layout)")
    q.add_argument("--salient", type=float, metavar="FRACTION",
                   help="method binary: share of each group's columns kept salient (two signs; default 0.1)")
    q.add_argument("--quantize-head", action="store_true",
                   help="quantize the output head (lm_head) too, with the blocks' format and method, calibrated on "
                   "the final norm's output (untied from the embedding first; default: kept in full precision)")
    q.add_argument("--calib", metavar="PATH_OR_DATASET",
                   help="calibration text: a .txt/.jsonl file, wikitext2 or c4 (hub), or self "
                   "(default: wikitext2 train, else text sampled from the model)")
    q.add_argument("--samples", type=_positive, default=128, help="calibration windows (default 128)")
    q.add_argument("--seq-len", type=_positive, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--batch-size", type=_positive,
                   help="calibration windows per forward pass (default: all at once)")
    q.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="calibrate every layer of a block on the unquantized block's activations")
    q.add_argument("--out", type=Path, help="output folder (default: ./<model>-<method>-w<bits>)")
    q.add_argument("--no-export", action="store_true", help="quantize and evaluate without writing a checkpoint")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (or discard an interrupted run's state)")
    q.add_argument("--resume", action="store_true",
                   help="continue the interrupted run that was writing --out from its last finished block")
    q.add_argument("--offload", choices=["auto", "none", "disk"], default="auto",
                   help="disk: read one block at a time from the model's safetensors files (models larger "
                   "than memory; no evaluation); auto (default): when the weights exceed half the free memory")
    q.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in memory-mapped files instead of memory")
    q.add_argument("--save-recipe", type=Path, help="also write the effective recipe to this YAML file")
    q.add_argument("--no-eval", action="store_true", help="skip perplexity / KL evaluation")
    _add_eval_options(q, "--eval-data", "--eval-seq-len", "16")
    _add_kv_options(q, evaluating=False)
    _add_runtime_options(q)
    budget_command.add_budget_options(q)
    _add_runtime_options(budget_command.add_plan_parser(commands))

    e = commands.add_parser("eval", help="perplexity and KL divergence of a model or a lowbit export")
    e.add_argument("model", help="model (id, folder, .gguf) or lowbit output folder; 'default' = embedded model")
    e.add_argument("--reference", help="original model for KL divergence ('default' = embedded model)")
    _add_eval_options(e, "--data", "--seq-len", "all")
    _add_kv_options(e, evaluating=True)
    _add_runtime_options(e)

    g = commands.add_parser("generate", help="greedy text and its speed from a model or a lowbit export (on a "
                            "GPU, run on its codes)")
    g.add_argument("model", help="lowbit output folder, or model (id, folder, .gguf); 'default' = embedded model")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-file", type=Path, metavar="PATH",
                        help="text to continue, read from a UTF-8 file (long prompts); only the continuation is printed")
    g.add_argument("--new-tokens", type=_positive, default=64, help="tokens to generate (default 64)")
    g.add_argument("--batch", type=_positive, default=1,
                   help="decode the prompt this many times at once, to time that batch size (default 1)")
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user's message: wrap it in the tokenizer's chat template")
    g.add_argument("--kv-cache", choices=[*ROW_KINDS, "none"],
                   help="int8-token or fp8: keep keys and values as 8-bit codes with a scale per token and head "
                   "(nearly half the memory; `lowbit eval --kv-cache KIND` scores the same cache); none: in the "
                   "model's dtype even where the export names one (default: the export's, if it names one of these)")
    _add_runtime_options(g)

    b = commands.add_parser("bench", help="speed benchmarks (GPU)").add_subparsers(dest="bench", required=True)
    k = b.add_parser("kernels", help="W4A16 matmul vs bf16 cuBLAS and torch int4 on Llama-3 8B/70B shapes")
    k.add_argument("--m", type=_positive, nargs="+", default=[1, 16, 64, 256], help="batch rows (default 1 16 64 256)")
    k.add_argument("--shapes", nargs="+", metavar="NAME", help="subset of shapes, e.g. '8B down_proj' (default all)")
    k.add_argument("--out", type=Path, help="also save PATH.json and PATH.md (e.g. benchmarks/results/gpu_kernels)")
    k.add_argument("--paths", nargs="+", choices=list(W4A16_PATHS),
                   help="matmul paths the dispatcher may choose among (default all available; fused always)")
    compare_command.add_parser(commands)
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = Recipe.load(args.recipe) if args.recipe else preset(args.scheme)
    # `lowbit plan` shares this function but offers neither --format nor --transform.
    number_format, transforms = getattr(args, "format", None), getattr(args, "transforms", None)
    if number_format is not None:
        family = FAMILIES[number_format]
        recipe = recipe.model_copy(update={"format": number_format, "bits": family.initial_bits,
                                           "group_size": family.group_size, "symmetric": True})
    updates = {
        key: value
        for key, value in {
            "method": args.method,
            "bits": args.bits,
            "group_size": args.group_size,
            "symmetric": args.symmetric,
            "scale_dtype": getattr(args, "scale_dtype", None),  # `lowbit plan` has no --scale-dtype
        }.items()
        if value is not None
    }
    if args.method is not None and args.method != recipe.method:
        updates["method_options"] = {}  # the scheme's solver options belong to the scheme's solver
    updates.update(_format_option_updates(args, recipe))
    if transforms:
        updates["transforms"] = list(dict.fromkeys([*recipe.transforms, *transforms]))
    activations = getattr(args, "activations", None)
    if activations is not None:
        try:
            updates["activations"] = parse_activations(activations)
        except ValidationError as err:
            raise RecipeError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
    for name, key, value in getattr(args, "transform_options", None) or []:
        options = updates.setdefault("transform_options", {k: dict(v) for k, v in recipe.transform_options.items()})
        options.setdefault(name, {})[key] = value
    kv_cache = kv_cache_from_args(args) if hasattr(args, "kv_cache") else None
    if kv_cache is not None:
        updates["kv_cache"] = kv_cache.model_dump()
    if getattr(args, "quantize_head", False):
        updates["ignore"] = [pattern for pattern in recipe.ignore if pattern != "lm_head"]
    try:
        recipe = Recipe.model_validate({**recipe.model_dump(), **updates})
    except ValidationError as err:
        raise RecipeError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
    options = dict(recipe.method_options)
    if args.act_order:
        options.update(act_order=True, static_groups=True)
    if args.damp is not None:
        options["damp"] = args.damp
    if getattr(args, "clip_search", None) is not None:
        options["clip_search"] = args.clip_search
    if getattr(args, "dynamic_groups", False):
        if args.act_order:
            raise RecipeError("--act-order needs static groups (to export); drop --dynamic-groups")
        options["static_groups"] = False
    if getattr(args, "salient", None) is not None:
        options["salient_fraction"] = args.salient
    extras = {key: value for key, value in {
        "outliers": getattr(args, "outliers", None),
        "outlier_criterion": getattr(args, "outlier_criterion", None),
        "eora_rank": getattr(args, "eora_rank", None),
    }.items() if value is not None}
    try:
        recipe = Recipe.model_validate({**recipe.model_dump(), **extras, "method_options": options})
    except ValidationError as err:
        raise RecipeError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
    for layer_recipe in recipe.layer_recipes():
        layer_recipe.solver()  # reject unknown options now, before loading anything
    return recipe


def _format_option_updates(args: argparse.Namespace, recipe: Recipe) -> dict:
    """Recipe fields set by the vq flags: --codebook-bits is `bits`, the rest `format_options`."""
    options = {key: value for key, value in {
        "dim": getattr(args, "vq_dim", None),
        "residual_bits": getattr(args, "residual_bits", None),
        "row_scale": True if getattr(args, "row_scale", False) else None,
    }.items() if value is not None}
    updates: dict = {"format_options": {**recipe.format_options, **options}} if options else {}
    if getattr(args, "codebook_bits", None) is not None:
        if args.bits is not None and args.bits != args.codebook_bits:
            raise RecipeError("--bits and --codebook-bits disagree; for vq give only --codebook-bits")
        updates["bits"] = args.codebook_bits
    return updates


def default_out_dir(model: str | None, recipe: Recipe, budget: budget_command.Budget | None = None) -> Path:
    name = "SmolLM2-135M-Instruct" if model is None else Path(model.rstrip("/")).name.removesuffix(".gguf")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    number = f"w{recipe.bits}" if recipe.format == "int" else recipe.format
    if recipe.activations is not None:
        inputs = recipe.activations
        number += f"a{inputs.bits}" if recipe.format == "int" and inputs.type == "int" else f"-a{inputs.type}"
    if budget is not None:
        number = budget_command.out_name(budget)
    return Path(f"{slug}-{recipe.method}-{number}")


def _settings(args: argparse.Namespace):
    from lowbit.api import Settings

    return Settings(
        calib=getattr(args, "calib", None),
        samples=getattr(args, "samples", 128),
        seq_len=getattr(args, "seq_len", 512),
        seed=args.seed,
        eval_data=args.eval_data,
        eval_seq_len=args.eval_seq_len,
        eval_windows=args.eval_windows,
        device=args.device,
        batch_size=getattr(args, "batch_size", None),
        true_sequential=getattr(args, "true_sequential", True),
        dtype=args.dtype,
        offload=getattr(args, "offload", "auto"),
        resume=getattr(args, "resume", False),
        offload_activations=getattr(args, "offload_activations", False),
        kv_cache=kv_cache_from_args(args) if args.command == "eval" else None,
        kv_chunk=getattr(args, "kv_chunk", DEFAULT_KV_CHUNK),
    )


def run_quantize(args: argparse.Namespace) -> None:
    from lowbit.api import quantize

    recipe = recipe_from_args(args)
    budget = budget_command.budget_from_args(args)
    out_dir = None if args.no_export else (args.out or default_out_dir(args.model, recipe, budget))
    if budget is not None:
        if not recipe.is_ignored("lm_head"):
            raise RecipeError("a budget plans the blocks' linears only; drop --quantize-head (or keep lm_head in the "
                              "recipe's ignore list) with --target-bits or --max-size")
        _, recipe = budget_command.choose(args, recipe, budget, _settings(args), console)
        if out_dir is not None:
            budget_command.save_plan(recipe, out_dir, console)
    console.print(f"[bold]lowbit[/] {__version__}: {recipe.describe()}")
    report = quantize(args.model, recipe, out_dir, _settings(args), overwrite=args.overwrite,
                      evaluate_result=not args.no_eval)
    if args.save_recipe:
        recipe.save(args.save_recipe)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, process 0 reports for all
        print_quantize_report(report)


def print_quantize_report(report) -> None:
    table = Table(title=f"{report.model}: {report.recipe.describe()}")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("quantized", justify="right")
    result = report.evaluation_result
    if result is not None:
        table.add_row("perplexity", f"{result.reference_perplexity:.3f}", f"{result.perplexity:.3f}")
        table.add_row("KL to original (nats/token)", "0", f"{result.kl:.4f}")
    if result is not None and result.cache_bytes_per_token is not None:
        table.add_row(f"KV cache bytes/token ({result.seq_len}-token context)",
                      f"{result.fp16_cache_bytes_per_token:.0f}", f"{result.cache_bytes_per_token:.0f}")
    size = report.linear_size
    table.add_row("quantized layers: bits/weight", "16", f"{size.bits_per_weight:.3f}")
    table.add_row("quantized layers: size (MB)", f"{size.parameters * 2 / 1e6:.1f}", f"{size.megabytes:.1f}")
    if report.checkpoint_megabytes is not None:
        table.add_row("checkpoint (MB)", f"{report.original_megabytes:.1f}", f"{report.checkpoint_megabytes:.1f}")
    for step, seconds in report.seconds.items():
        table.add_row(f"time: {step} (s)", "", f"{seconds:.1f}")
    console.print(table)
    console.print("original sizes are at 16 bits per weight (bf16/fp16 storage)")
    console.print(f"calibration: {report.calibration}")
    if result is not None:
        console.print(
            f"evaluation: {report.evaluation}; {result.windows} non-overlapping windows of {result.seq_len} "
            f"tokens ({result.tokens} scored), {result.protocol}"
        )
    if report.out_dir is not None and report.export_max_abs_diff is None:
        console.print(
            f"wrote [bold]{report.out_dir}[/] (compressed-tensors), streamed from disk: not reloaded or "
            f"evaluated here (that needs the whole model in memory); `lowbit eval {report.out_dir}` does both"
        )
    elif report.out_dir is not None:
        from lowbit.export.compressed_tensors import METADATA_FILE

        layout = json.loads((report.out_dir / METADATA_FILE).read_text())["export_format"]
        console.print(
            f"wrote [bold]{report.out_dir}[/] ({layout}); reloaded logits differ from the "
            f"in-memory model by at most {report.export_max_abs_diff:.2e}"
        )


def run_eval(args: argparse.Namespace) -> None:
    from lowbit.api import evaluate_model

    source = None if args.model == "default" else args.model
    result, description = evaluate_model(source, args.eval_data, args.reference, _settings(args))
    table = Table(title=f"{args.model} on {description}")
    table.add_column("perplexity", justify="right")
    table.add_column("KL to reference", justify="right")
    table.add_column("windows x tokens", justify="right")
    table.add_column("seconds", justify="right")
    kl = "-" if result.kl is None else f"{result.kl:.4f}"
    table.add_row(f"{result.perplexity:.3f}", kl, f"{result.windows} x {result.seq_len}", f"{result.seconds:.1f}")
    console.print(table)
    console.print(f"scoring: {result.protocol}")
    if result.cache_bytes_per_token is not None:
        console.print(
            f"KV cache at a {result.seq_len}-token context: {result.cache_bytes_per_token:.0f} bytes/token "
            f"(fp16: {result.fp16_cache_bytes_per_token:.0f}, "
            f"{result.fp16_cache_bytes_per_token / result.cache_bytes_per_token:.2f}x smaller)"
        )


def run_generate(args: argparse.Namespace) -> None:
    from lowbit.api import generate_text

    prompt = args.prompt if args.prompt_file is None else _read_prompt_file(args.prompt_file)
    kv_cache = spec_of_name(args.kv_cache) if args.kv_cache in ROW_KINDS else args.kv_cache
    report = generate_text(None if args.model == "default" else args.model, prompt, args.new_tokens,
                           args.batch, args.device, args.dtype, args.chat, kv_cache,
                           progress=lambda message: console.print(message, style="dim", highlight=False))
    table = Table(title=f"{args.model}: {report.batch} x {report.new_tokens} greedy tokens on {report.device}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for measure, value in (("tokens/s", f"{report.tokens_per_second:.1f}"),
                           ("ms/step", f"{1e3 * report.seconds / report.new_tokens:.2f}"),
                           ("load s", f"{report.load_seconds:.1f}"), ("warm-up s", f"{report.warmup_seconds:.1f}"),
                           ("prompt s", f"{report.prompt_seconds:.2f}"), ("KV cache", report.kv_cache),
                           ("KV cache MB", f"{report.kv_cache_bytes / 2**20:.1f}"),
                           ("layers on their codes", str(report.packed_layers)),
                           ("step", "fused" if report.fused_step else "modules"),
                           ("CUDA graph", "yes" if report.graph else "no")):
        table.add_row(measure, value)
    console.print(table)
    echoed = args.chat or args.prompt_file is not None  # a chat turn's or a file's prompt is not repeated
    console.print(report.text if echoed else prompt + report.text, highlight=False, markup=False)


def _read_prompt_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no prompt file at {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read the prompt file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; give --prompt-file a text file") from None


def run_bench(args: argparse.Namespace) -> None:
    from lowbit.bench import kernels

    result = kernels.run(args.shapes, tuple(args.m), paths=tuple(args.paths or ()))
    table = kernels.markdown_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(table)
    console.print(table, markup=False, highlight=False)


def _one_line(err: BaseException) -> str:
    """The first line of an error, with what to do where the exception itself cannot know it."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return (f"no space left on the device{where}; nothing was written as complete: free space and "
                "rerun with --resume (finished blocks are kept)")
    if isinstance(err, MemoryError) and not message:
        return "out of memory; rerun with --resume and --offload-activations, or a smaller --batch-size"
    return message or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.simplefilter("default")
    try:
        if args.command == "compare":
            compare_command.run(args, console, argv)
        else:
            {"quantize": run_quantize, "eval": run_eval, "generate": run_generate, "bench": run_bench,
             "plan": lambda args: budget_command.run_plan(args, console)}[args.command](args)
    except (ValueError, OSError, MemoryError) as err:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {_one_line(err)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: nothing was written as complete")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
