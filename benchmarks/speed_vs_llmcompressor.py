"""Side-by-side timing: lowbit's GPTQ against llm-compressor 0.14's on the embedded SmolLM2-135M.

Setting: GPTQ, int4 asymmetric, group size 64, every decoder Linear quantized, lm_head not; the model
loaded from its GGUF in float32 on the CPU; 128 calibration windows of 512 tokens drawn once, here,
from wikitext-2 valid.txt and handed to both tools, so both calibrate on exactly the same tokens.

    bash benchmarks/setup_llmcompressor.sh          # once: .venv-llmcompressor (llm-compressor 0.14)
    python benchmarks/speed_vs_llmcompressor.py     # writes benchmarks/results/speed_vs_llmcompressor.{json,md}

Per repeat, llm-compressor runs first (benchmarks/peers/llmcompressor_gptq.py in its own virtual
environment and process; only its `oneshot` call is timed), then lowbit (SequentialQuantizer on a
fresh copy of the model; only `run` is timed), so lowbit never benefits from a cache the other tool
warmed, while llm-compressor starts in a fresh process. Both quantized models are then scored by the
same evaluation function: WikiText-2 test perplexity over the first 16 non-overlapping 2048-token
windows, and the KL divergence to the original model. lowbit's time is also split into its parts
(embedding capture, Hessian products, GPTQ solves, Cholesky/inverse) by timers around those calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.calibrate.stats import HessianStats
from lowbit.models.architectures import architecture_of
from lowbit.models.loading import DEFAULT_MODEL_FILE, default_model_path, load_model
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe
from lowbit.solvers import gptq as gptq_module

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
VENV = ROOT / ".venv-llmcompressor"
WORKER = ROOT / "benchmarks" / "peers" / "llmcompressor_gptq.py"
BITS, GROUP_SIZE = 4, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each tool; the median is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for both tools (default: torch's own choice)")
    parser.add_argument("--llmc-actorder", choices=["none", "static"], default="none",
                        help="llm-compressor's actorder; 'none' matches lowbit's recipe (its own default is static)")
    parser.add_argument("--llmc-batch-size", type=int, default=1, help="oneshot batch_size (llm-compressor's default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_vs_llmcompressor")
    args = parser.parse_args()

    venv_python = VENV / "bin" / "python"
    if not venv_python.is_file():
        sys.exit(
            f"llm-compressor's virtual environment is missing ({VENV.relative_to(ROOT)}/).\n"
            "Create it once with:\n\n    bash benchmarks/setup_llmcompressor.sh\n\n"
            "then run this benchmark again."
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    busy = busy_cpu_seconds()
    time.sleep(5)
    others_at_start = (busy_cpu_seconds() - busy) / 5
    if others_at_start > 0.25:
        print(f"warning: other processes are using {others_at_start:.1f} of {os.cpu_count()} CPUs; timings will be "
              "inflated (multi-threaded BLAS/LAPACK calls such as cholesky_inverse slow down badly when "
              "a thread is descheduled); run on a quiet machine for numbers to publish", flush=True)

    loaded = load_model(None, dtype="float32")
    original, tokenizer = loaded.model, loaded.tokenizer
    calibration, calibration_source = calibration_tokens(tokenizer, args.samples, args.seq_len, seed=0)
    recipe = Recipe(method="gptq", bits=BITS, symmetric=False, group_size=GROUP_SIZE)
    order = "per repeat: llm-compressor (fresh process) first, then lowbit (same process as this driver)"

    llmc_runs, lowbit_runs = [], []
    lowbit_model = llmc_weights = None
    with tempfile.TemporaryDirectory(prefix="speed-vs-llmc-") as tmp:
        windows_path = Path(tmp) / "calibration_windows.pt"
        torch.save(calibration, windows_path)
        for repeat in range(args.repeats):
            print(f"[{repeat + 1}/{args.repeats}] llm-compressor oneshot ...", flush=True)
            run, weights = run_llmcompressor(venv_python, windows_path, Path(tmp) / f"llmc-{repeat}", args)
            llmc_runs.append(run)
            llmc_weights = weights
            print(f"    oneshot {run['oneshot_seconds']:.1f} s (worker wall {run['worker_wall_seconds']:.1f} s)",
                  flush=True)
            print(f"[{repeat + 1}/{args.repeats}] lowbit SequentialQuantizer.run ...", flush=True)
            del lowbit_model
            lowbit_model, run = run_lowbit(original, recipe, calibration)
            lowbit_runs.append(run)
            print(f"    run {run['seconds']:.1f} s; parts: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in run["breakdown"].items()), flush=True)

    llmc_model = copy.deepcopy(original)
    apply_weights(llmc_model, llmc_weights, expected=set(lowbit_runs[-1]["quantized"]))

    print("evaluating (same function for every model) ...", flush=True)
    test_tokens, evaluator, evaluator_name = evaluation_setup(tokenizer)
    scores = evaluator({"lowbit": lowbit_model, "llmcompressor": llmc_model}, original, test_tokens,
                       seq_len=args.eval_seq_len, max_windows=args.eval_windows)
    base = scores["original"]
    for name, model in (("lowbit", lowbit_model), ("llmcompressor", llmc_model)):
        scores[name]["weight_relative_error"] = weight_relative_error(model, original, lowbit_runs[-1]["quantized"])

    llmc_seconds = statistics.median(r["oneshot_seconds"] for r in llmc_runs)
    lowbit_seconds = statistics.median(r["seconds"] for r in lowbit_runs)
    worker = llmc_runs[-1]
    result = {
        "setting": {
            "model": loaded.name,
            "model_dtype": "float32 (GGUF dequantized on load), CPU",
            "scheme": f"GPTQ int{BITS} asymmetric, group size {GROUP_SIZE}, decoder Linear layers, lm_head not quantized",
            "calibration": f"{args.samples} x {args.seq_len} tokens, random windows of wikitext-2 valid.txt "
            f"(torch.Generator seed 0, via {calibration_source}); the same tensor is given to both tools",
            "evaluation": f"wikitext-2 test.txt, first {base['windows']} non-overlapping {args.eval_seq_len}-token "
            f"windows ({base['tokens']} tokens scored; loss on every position but the first of each window); "
            f"KL(original || quantized) per token; one function for every model: {evaluator_name}",
            "lowbit": f"SequentialQuantizer + Recipe(method='gptq', bits={BITS}, symmetric=False, "
            f"group_size={GROUP_SIZE}) = {recipe.describe()}; solver defaults {recipe.solver()!r}; all "
            "samples in one batch per block, true-sequential",
            "llm-compressor": "oneshot + GPTQModifier(config_groups int4 asym group 64 on Linear, ignore "
            f"lm_head, actorder={args.llmc_actorder}, block_size 128, dampening_frac 0.01), pipeline "
            f"'sequential', batch_size {args.llmc_batch_size}, shuffle off",
            "timed": "lowbit: SequentialQuantizer.run only; llm-compressor: the oneshot call only "
            "(model loading, tokenization and saving excluded on both sides)",
            "order": order,
            "repeats": args.repeats,
        },
        "timings": {
            "llmcompressor_oneshot_seconds_median": llmc_seconds,
            "lowbit_quantize_seconds_median": lowbit_seconds,
            "ratio_llmcompressor_over_lowbit": llmc_seconds / lowbit_seconds,
            "llmcompressor_runs": llmc_runs,
            "lowbit_runs": [{k: v for k, v in r.items() if k != "quantized"} for r in lowbit_runs],
        },
        "quality": scores,
        "versions": {
            "lowbit": lowbit.__version__,
            "lowbit_commit": git_commit(),
            "driver_torch": torch.__version__,
            "driver_transformers": __import__("transformers").__version__,
            "llmcompressor_env": worker["versions"],
        },
        "machine": {**machine(), "other_processes_cores_at_start": others_at_start},
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)


# --- calibration and evaluation data ---------------------------------------------------------------


def calibration_tokens(tokenizer, samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """[samples, seq_len] int64 windows of valid.txt, from lowbit's helper when it exists."""
    try:
        from lowbit.calibrate.data import calibration_windows, load_text
    except ImportError:
        text = (DATA / "valid.txt").read_text(encoding="utf-8")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
        windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        source = "this script (lowbit.calibrate.data.calibration_windows not available)"
    else:
        windows = calibration_windows(tokenizer, load_text(str(DATA / "valid.txt")), samples, seq_len, seed=seed)
        windows = torch.as_tensor(windows, dtype=torch.int64)
        source = "lowbit.calibrate.data.calibration_windows"
    if tuple(windows.shape) != (samples, seq_len):
        raise SystemExit(f"calibration windows have shape {tuple(windows.shape)}, expected {(samples, seq_len)}")
    return windows.contiguous(), source


def evaluation_setup(tokenizer):
    """Test-set token ids and the one evaluation routine applied to every model.

    The routine takes {name: model} and the original model and returns {name: metrics} plus an
    "original" entry. With lowbit.evaluate available it calls lowbit's `evaluate` on each model (KL
    against the original); otherwise `perplexity_and_kl` below scores all models window by window,
    running the original once per window for both the KL terms and its own perplexity.
    """
    try:
        from lowbit.calibrate.data import load_text, tokenize_text
        from lowbit.evaluate import evaluate
    except ImportError:
        text = (DATA / "test.txt").read_text(encoding="utf-8")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        return ids, perplexity_and_kl, "perplexity_and_kl in this script (lowbit.evaluate not available)"

    def with_lowbit(models: dict, original, tokens, seq_len: int, max_windows: int) -> dict:
        scores = {}
        for name, model in models.items():
            r = evaluate(model, tokens, seq_len=seq_len, max_windows=max_windows, reference=original)
            scores[name] = {"perplexity": r.perplexity, "kl": r.kl, "windows": r.windows, "tokens": r.tokens,
                            "seconds": r.seconds}
            # The reference's perplexity comes with every KL pass; all passes must agree on it.
            reference = {"perplexity": r.reference_perplexity, "kl": None, "windows": r.windows, "tokens": r.tokens}
            if "original" in scores and scores["original"]["perplexity"] != reference["perplexity"]:
                print(f"warning: the original model scored {scores['original']['perplexity']} and "
                      f"{reference['perplexity']} in two evaluation passes", flush=True)
            scores.setdefault("original", reference)
        return scores

    return tokenize_text(tokenizer, load_text(str(DATA / "test.txt"))), with_lowbit, "lowbit.evaluate.evaluate"


@torch.no_grad()
def perplexity_and_kl(models: dict, original, tokens: torch.Tensor, seq_len: int, max_windows: int) -> dict:
    """Perplexity of each model (and of `original`) and KL(original || model) per scored token.

    Windows: the first `max_windows` non-overlapping `seq_len`-token windows of `tokens`. Each window
    is scored on every position but the first (nothing precedes it in the window).
    """
    windows = min(tokens.numel() // seq_len, max_windows)
    nll = dict.fromkeys(["original", *models], 0.0)
    kl = dict.fromkeys(models, 0.0)
    scored = 0
    for index in range(windows):
        ids = tokens[index * seq_len : (index + 1) * seq_len].unsqueeze(0)
        targets = ids[0, 1:].unsqueeze(1)
        ref = F.log_softmax(original(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        nll["original"] += float(-ref.gather(1, targets).sum())
        ref_p = ref.exp()
        for name, model in models.items():
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            nll[name] += float(-logp.gather(1, targets).sum())
            kl[name] += float((ref_p * (ref - logp)).sum())
            del logp
        scored += targets.numel()
        del ref, ref_p
    return {
        name: {"perplexity": math.exp(total / scored), "kl": kl[name] / scored if name in kl else None,
               "windows": windows, "tokens": scored}
        for name, total in nll.items()
    }


# --- the two tools ---------------------------------------------------------------------------------


def run_llmcompressor(venv_python: Path, windows: Path, out_dir: Path, args) -> tuple[dict, dict]:
    model_file = default_model_path()
    command = [
        str(venv_python), str(WORKER),
        "--model-dir", str(model_file.parent), "--gguf-file", DEFAULT_MODEL_FILE,
        "--windows", str(windows), "--out-dir", str(out_dir),
        "--bits", str(BITS), "--group-size", str(GROUP_SIZE),
        "--actorder", args.llmc_actorder, "--batch-size", str(args.llmc_batch_size),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "worker.log"
    load_before = os.getloadavg()[0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = busy_cpu_seconds()
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    busy = busy_cpu_seconds() - busy
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children_after.ru_utime - children.ru_utime) + (children_after.ru_stime - children.ru_stime)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        sys.exit("llm-compressor worker failed (exit code %d); last lines of its log:\n%s"
                 % (done.returncode, "\n".join(tail)))
    result = json.loads((out_dir / "result.json").read_text())
    if result["lowbit_importable"]:
        sys.exit("lowbit is importable inside .venv-llmcompressor; recreate it with benchmarks/setup_llmcompressor.sh")
    from safetensors.torch import load_file

    weights = load_file(str(out_dir / "weights.safetensors"))
    run = {
        "oneshot_seconds": result["oneshot_seconds"],
        "oneshot_cpu_seconds": result["oneshot_cpu_seconds"],
        "oneshot_system_cpu_seconds": result["oneshot_system_cpu_seconds"],
        "oneshot_minor_page_faults": result["oneshot_minor_page_faults"],
        "worker_total_seconds": result["total_seconds"],
        "worker_model_load_seconds": result["model_load_seconds"],
        "worker_wall_seconds": wall,
        "torch_threads": result["torch_threads"],
        "quantized_linears": result["quantized_linears"],
        "qdq_max_abs_gap": result["qdq_max_abs_gap"],
        "layers_dequantized_by_worker": result["layers_dequantized_by_worker"],
        "settings": result["settings"],
        "versions": result["versions"],
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "other_processes_cores_average": max(busy - own, 0.0) / wall,
    }
    return run, weights


def run_lowbit(original, recipe: Recipe, calibration: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    model = copy.deepcopy(original)
    quantized: list[str] = []
    load_before = os.getloadavg()[0]
    with part_timers() as parts:
        busy = busy_cpu_seconds()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_start = time.process_time()
        start = time.perf_counter()
        SequentialQuantizer(model, architecture_of(model), recipe.plan(),
                            on_quantized=lambda name, q: quantized.append(name)).run(calibration)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        busy = busy_cpu_seconds() - busy
    own = (usage_after.ru_utime - usage.ru_utime) + (usage_after.ru_stime - usage.ru_stime)
    forward = seconds - parts["embed + capture first block inputs"] - parts["Hessian x^T x (addmm)"] \
        - parts["GPTQ solve (all of _solve)"]
    breakdown = {
        "embed + capture first block inputs": parts["embed + capture first block inputs"],
        "block forward passes (rest of the block loop)": forward,
        "Hessian x^T x (addmm)": parts["Hessian x^T x (addmm)"],
        "GPTQ solve (all of _solve)": parts["GPTQ solve (all of _solve)"],
        "  of which Cholesky + inverse": parts["Cholesky + inverse"],
    }
    run = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "system_cpu_seconds": usage_after.ru_stime - usage.ru_stime,
        "minor_page_faults": usage_after.ru_minflt - usage.ru_minflt,
        "torch_threads": torch.get_num_threads(),
        "quantized_linears": len(quantized),
        "breakdown": breakdown,
        "hessian_gflop_per_second": parts.hessian_flops / max(parts["Hessian x^T x (addmm)"], 1e-9) / 1e9,
        "calls": dict(parts.calls),
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "other_processes_cores_average": max(busy - own, 0.0) / seconds,
        "quantized": quantized,
    }
    return model, run


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _Parts(dict):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.hessian_flops = 0.0

    def __missing__(self, key: str) -> float:
        return 0.0


@contextmanager
def part_timers():
    """Wall-clock seconds spent inside lowbit's pipeline steps (timers wrapped around the calls)."""
    parts = _Parts()
    originals = []

    def wrap(owner, attribute: str, label: str) -> None:
        function = getattr(owner, attribute)
        originals.append((owner, attribute, function))

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                parts[label] = parts[label] + time.perf_counter() - start
                parts.calls[label] += 1

        setattr(owner, attribute, timed)

    wrap(SequentialQuantizer, "_capture_first_block_inputs", "embed + capture first block inputs")
    add = HessianStats.add

    def counted_add(self, x):
        parts.hessian_flops += 2.0 * x.numel() * x.shape[-1]  # x^T x over tokens: 2 n d^2
        return add(self, x)

    HessianStats.add = counted_add
    originals.append((HessianStats, "add", add))
    wrap(HessianStats, "add", "Hessian x^T x (addmm)")
    wrap(SequentialQuantizer, "_solve", "GPTQ solve (all of _solve)")
    wrap(gptq_module, "inverse_hessian_factor", "Cholesky + inverse")
    try:
        yield parts
    finally:
        for owner, attribute, function in reversed(originals):
            setattr(owner, attribute, function)


def apply_weights(model: torch.nn.Module, weights: dict, expected: set[str]) -> None:
    """Load llm-compressor's dense quantized weights into a copy of the original model."""
    names = {k.removesuffix(".weight") for k in weights}
    if names != expected:
        raise SystemExit(f"llm-compressor and lowbit quantized different layers: only llm-compressor "
                         f"{sorted(names - expected)[:5]}, only lowbit {sorted(expected - names)[:5]}")
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"unexpected tensors from llm-compressor: {result.unexpected_keys[:5]}")


@torch.no_grad()
def weight_relative_error(model, original, names: list[str]) -> float:
    """sum ||W_q - W||^2 / sum ||W||^2 over the quantized linears: how far each tool moved the weights."""
    err = norm = 0.0
    for name in names:
        w = original.get_submodule(name).weight.float()
        err += float((model.get_submodule(name).weight.float() - w).square().sum())
        norm += float(w.square().sum())
    return err / norm


# --- report ----------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return commit + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "note": "shared machine: other processes may have been running; see the load averages per run",
    }


def markdown(result: dict) -> str:
    s, t, q = result["setting"], result["timings"], result["quality"]
    llmc_runs, lowbit_runs = t["llmcompressor_runs"], t["lowbit_runs"]

    def runs(values):
        return ", ".join(f"{v:.1f}" for v in values)

    def kl(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [
        "# lowbit vs llm-compressor: GPTQ speed",
        "",
        f"Model: {s['model']}, {s['model_dtype']}. Scheme: {s['scheme']}.",
        f"Calibration: {s['calibration']}.",
        f"Evaluation: {s['evaluation']}.",
        f"Timed: {s['timed']}. Order: {s['order']}. Repeats: {s['repeats']} (median reported).",
        "",
        "| tool | quantize time (s, median) | runs (s) | perplexity | KL to original | weight rel. error |",
        "|---|---:|---:|---:|---:|---:|",
        f"| original (float32) | - | - | {q['original']['perplexity']:.3f} | - | - |",
        f"| llm-compressor {result['versions']['llmcompressor_env']['llmcompressor']} | "
        f"{t['llmcompressor_oneshot_seconds_median']:.1f} | {runs(r['oneshot_seconds'] for r in llmc_runs)} | "
        f"{q['llmcompressor']['perplexity']:.3f} | {kl(q['llmcompressor']['kl'])} | "
        f"{q['llmcompressor']['weight_relative_error']:.5f} |",
        f"| lowbit {result['versions']['lowbit']} | {t['lowbit_quantize_seconds_median']:.1f} | "
        f"{runs(r['seconds'] for r in lowbit_runs)} | {q['lowbit']['perplexity']:.3f} | {kl(q['lowbit']['kl'])} | "
        f"{q['lowbit']['weight_relative_error']:.5f} |",
        "",
        f"**Ratio llm-compressor / lowbit: {t['ratio_llmcompressor_over_lowbit']:.2f}x** "
        f"(goal: >= 2x). llm-compressor worker wall time including imports and model load: "
        f"{runs(r['worker_wall_seconds'] for r in llmc_runs)} s.",
        "",
        "lowbit's time by part (last run; timers around the pipeline's calls):",
        "",
        "| part | seconds |",
        "|---|---:|",
    ]
    for part, seconds in lowbit_runs[-1]["breakdown"].items():
        lines.append(f"| {part} | {seconds:.1f} |")
    lines += [
        "",
        f"lowbit: {s['lowbit']}.",
        f"llm-compressor: {s['llm-compressor']}.",
        "",
        "Threads and contention (CPU used by other processes on this shared machine while each tool ran; "
        "1-minute load average before -> after):",
        "",
    ]
    for i, (a, b) in enumerate(zip(llmc_runs, lowbit_runs), 1):
        lines.append(
            f"- repeat {i}: llm-compressor {a['torch_threads']} threads, CPU time {a['oneshot_cpu_seconds']:.0f} s "
            f"(system {a['oneshot_system_cpu_seconds']:.0f} s, {a['oneshot_minor_page_faults'] / 1e6:.1f} M page "
            f"faults), other processes used {a['other_processes_cores_average']:.2f} cores on average during the "
            f"worker, load {a['load_average_1min_before']:.2f} -> {a['load_average_1min_after']:.2f}; lowbit "
            f"{b['torch_threads']} threads, CPU time {b['cpu_seconds']:.0f} s (system {b['system_cpu_seconds']:.0f} s, "
            f"{b['minor_page_faults'] / 1e6:.1f} M page faults), Hessian products at "
            f"{b['hessian_gflop_per_second']:.0f} GFLOP/s, other processes used "
            f"{b['other_processes_cores_average']:.2f} cores on average, load {b['load_average_1min_before']:.2f} -> "
            f"{b['load_average_1min_after']:.2f}"
        )
    m, v = result["machine"], result["versions"]
    env = v["llmcompressor_env"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, {m['platform']}; {m['note']}.",
        f"Versions: lowbit {v['lowbit']} ({v['lowbit_commit']}), torch {v['driver_torch']}, transformers "
        f"{v['driver_transformers']}; llm-compressor env: llmcompressor {env['llmcompressor']}, compressed-tensors "
        f"{env['compressed_tensors']}, transformers {env['transformers']}, torch {env['torch']}.",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
