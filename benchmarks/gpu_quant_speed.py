"""GPU quantization speed: lowbit's GPTQ pipeline on a Llama-3-8B-shaped model, and llm-compressor's.

Setting (issue 6): random bf16 weights with Llama-3-8B's shapes (benchmarks/gpu_model.py), every
decoder Linear to int4 asymmetric group 128 with GPTQ (damp 0.01, block 128, no act-order), lm_head
kept; 128 calibration samples of 2048 random token ids (values do not change the work). The model
sits in CPU memory; lowbit's SequentialQuantizer streams one block at a time to the GPU, keeps the
activations on the GPU, runs bf16 block forwards in batches of --batch-size samples, accumulates
Hessians with bf16 tensor-core products into float32, and solves in float32 on the GPU (Triton
kernel for GPTQ's column loop). Timed: `run` alone, synchronised. llm-compressor 0.14 runs in a
subprocess on the same tokens and the same model (--peer-layers decoder layers; it needs its
wheels on --peer-path), timed around `oneshot`; the ratio is per decoder layer.

`--ranges` times the integer schemes' GPTQ instead (static groups fitted with an MSE clipping
search, recipes/presets.py GPTQ_RANGES): the same work plus the clipping search per group.

    python benchmarks/gpu_quant_speed.py --out benchmarks/results/gpu_quant_speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# What the user exported, before lowbit's import adds its default: the peer runs under this.
USER_THP = os.environ.get("THP_MEM_ALLOC_ENABLE")
import lowbit  # noqa: E402  (first, as in the CLI: it asks torch's CPU allocator for huge pages)
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import llama3_8b_config, random_model  # noqa: E402

from lowbit.calibrate.stats import HessianStats  # noqa: E402
from lowbit.formats.integer import IntegerFormat  # noqa: E402
from lowbit.models.architectures import architecture_of  # noqa: E402
from lowbit.pipeline.sequential import SequentialQuantizer  # noqa: E402
from lowbit.recipes.presets import GPTQ_RANGES  # noqa: E402
from lowbit.solvers.gptq import GPTQ  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FMT = IntegerFormat(bits=4, symmetric=False, group_size=128)


def timed(owner, name: str, totals: dict) -> None:
    """Wrap owner.name so that its synchronised wall time adds to totals[name]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            totals[f"{getattr(owner, '__name__', owner)}.{name}"] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _breakdown_targets() -> list[tuple[object, str]]:
    """What --breakdown times, outermost first (the timers nest: a block forward includes its
    Hessian products, a group's solve includes GPTQ.solve, which includes the factorisation)."""
    from lowbit.formats.base import QuantizedWeight
    from lowbit.kernels import gptq_block
    from lowbit.pipeline import sequential
    from lowbit.solvers import gptq

    return [
        (SequentialQuantizer, "_capture_first_block_inputs"),
        (torch.nn.Module, "to"),  # in the run: each block to the GPU (the copies back, block_memory.py, untimed)
        (SequentialQuantizer, "_forward_all"),
        (HessianStats, "add"),
        (SequentialQuantizer, "_solve"),
        (GPTQ, "solve"),
        (gptq, "inverse_hessian_factor"),
        (gptq_block, "gptq_block"),
        (QuantizedWeight, "dequantize"),
        (sequential, "_to_cpu"),
    ]


class BlockClock:
    """Synchronised wall time of each block (hooks of SequentialQuantizer): the first includes compiles,
    so the stage timers' `totals` are also kept as they stood after it."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.seconds: list[float] = []
        self.start = 0.0
        self.totals = totals
        self.after_first: dict[str, float] = {}

    def before_block(self, index: int, block: torch.nn.Module) -> None:
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def after_block(self, index: int, block: torch.nn.Module, hidden) -> None:
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)
        if index == 0:
            self.after_first = dict(self.totals)


def run_lowbit(layers: int, tokens: torch.Tensor, batch_size: int, breakdown: bool, ranges: bool = False,
               use_shortcuts: bool = True) -> dict:
    model = random_model(llama3_8b_config(LlamaConfig, layers), LlamaForCausalLM)
    count, errors = 0, []

    def on_quantized(name, qweight):
        nonlocal count
        count += 1
        errors.append(qweight.metadata["hessian_error"])

    totals: dict[str, float] = defaultdict(float)
    clock = BlockClock(totals)
    if breakdown:
        for owner, name in _breakdown_targets():
            timed(owner, name, totals)
    solver = GPTQ(**GPTQ_RANGES) if ranges else GPTQ()
    quantizer = SequentialQuantizer(model, architecture_of(model), lambda name, linear: (FMT, solver),
                                    device="cuda", batch_size=batch_size, activations_on_device=True,
                                    on_quantized=on_quantized, hooks=[clock] if breakdown else (),
                                    use_shortcuts=use_shortcuts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    quantizer.run(tokens)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if count != 7 * layers or not all(torch.isfinite(torch.tensor(errors))):
        raise SystemExit(f"expected {7 * layers} finite GPTQ results, got {count}")
    tool = "lowbit (static groups + clip search)" if ranges else "lowbit" if use_shortcuts else "lowbit (no shortcuts)"
    return {"tool": tool, "seconds": seconds, "layers": layers, "quantized_linears": count,
            "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9, "batch_size": batch_size,
            "breakdown_seconds": dict(totals) if breakdown else None,
            "breakdown_seconds_after_first_block": {k: v - clock.after_first.get(k, 0.0) for k, v in totals.items()}
            if breakdown else None,
            "block_seconds": clock.seconds if breakdown else None}


def run_peer(layers: int, tokens: torch.Tensor, peer_path: str, batch_size: int, timeout: float) -> dict:
    """llm-compressor in a subprocess; on a timeout, the layers its log says it finished and their time."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.pt")
        torch.save(tokens, path)
        env = {**os.environ, "PYTHONPATH": peer_path, "PYTHONUNBUFFERED": "1"}
        env.pop("THP_MEM_ALLOC_ENABLE")
        if USER_THP is not None:
            env["THP_MEM_ALLOC_ENABLE"] = USER_THP
        command = [sys.executable, str(ROOT / "benchmarks" / "peers" / "llmcompressor_gpu.py"),
                   "--layers", str(layers), "--tokens", path, "--batch-size", str(batch_size)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as stopped:
            log = (stopped.stderr or b"").decode(errors="replace") if isinstance(stopped.stderr, bytes) else (stopped.stderr or "")
            return {"tool": "llm-compressor", "error": [f"timed out after {time.perf_counter() - start:.0f} s "
                                                        f"(wall clock, model build included)"],
                    "log_tail": log.splitlines()[-20:]}
    if done.returncode:
        return {"tool": "llm-compressor", "error": done.stderr.strip().splitlines()[-5:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"GPTQ int4 asym g128 of a random Llama-3-8B-shaped model, {meta['samples']}x{meta['seq_len']} "
             f"calibration tokens, on {meta['device']} (torch {meta['torch']}"
             + (f", THP_MEM_ALLOC_ENABLE={meta['thp']}" if meta.get("thp") else "")
             + (f" for lowbit, {meta['peer_thp'] or 'unset'} for llm-compressor"
                if "peer_thp" in meta and any(r["tool"] == "llm-compressor" for r in result["runs"]) else "")
             + ").", "",
             "| tool | decoder layers | batch | seconds | seconds / layer | peak GPU GB |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['tool']} | failed: {' / '.join(r['error'])} | | | | |")
            continue
        lines.append(f"| {r['tool']} | {r['layers']} | {r['batch_size']} | {r['seconds']:.1f} | "
                     f"{r['seconds'] / r['layers']:.2f} | {r['peak_gpu_GB']:.1f} |")
    for r in result["runs"]:
        if r.get("breakdown_seconds"):
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["breakdown_seconds"].items())
            blocks = ", ".join(f"{t:.2f}" for t in r["block_seconds"])
            lines.append(f"\nlowbit ({r['layers']} layers), seconds per block: {blocks}.")
            lines.append(f"\nlowbit ({r['layers']} layers), synchronised timers (nested: a forward includes its "
                         f"Hessian adds, a group solve includes GPTQ.solve): {parts}.")
            if r.get("breakdown_seconds_after_first_block"):
                steady = ", ".join(f"{k} {v:.1f} s" for k, v in r["breakdown_seconds_after_first_block"].items())
                lines.append(f"\nThe same timers over the blocks after the first (no compiles): {steady}.")
    if result.get("ratio_per_layer"):
        lines.append(f"\nllm-compressor / lowbit, seconds per layer on the same layers: {result['ratio_per_layer']:.1f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--breakdown", action="store_true", help="also time every stage and each block (adds syncs)")
    parser.add_argument("--peer-layers", type=int, default=0, help="decoder layers for llm-compressor (0: skip)")
    parser.add_argument("--peer-path", default="", help="PYTHONPATH holding llm-compressor 0.14 and its deps")
    parser.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds before the peer is stopped")
    parser.add_argument("--ranges", action="store_true",
                        help="also time the integer schemes' GPTQ (static groups + MSE clipping search)")
    parser.add_argument("--without-shortcuts", action="store_true",
                        help="also time lowbit with every pass running the whole block (pipeline/shortcuts.py)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return
    tokens = torch.randint(0, 128256, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    # lowbit first: its result is in hand even if the (slower) peer is stopped by --peer-timeout.
    runs = [run_lowbit(args.layers, tokens, args.batch_size, breakdown=args.breakdown)]
    print(json.dumps(runs[0]), flush=True)
    if args.without_shortcuts:
        runs.append(run_lowbit(args.layers, tokens, args.batch_size, breakdown=False, use_shortcuts=False))
        print(json.dumps(runs[-1]), flush=True)
    if args.ranges:
        runs.append(run_lowbit(args.layers, tokens, args.batch_size, breakdown=False, ranges=True))
        print(json.dumps(runs[-1]), flush=True)
    if args.peer_layers:
        if args.peer_layers != args.layers:
            runs.append(run_lowbit(args.peer_layers, tokens, args.batch_size, breakdown=False))
            print(json.dumps(runs[-1]), flush=True)
        runs.insert(0, run_peer(args.peer_layers, tokens, args.peer_path, 1, args.peer_timeout))
    print(json.dumps(runs[0]))
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "lowbit": lowbit.__version__,
                       "samples": args.samples,
                       "seq_len": args.seq_len, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"), "peer_thp": USER_THP,
                       "date": time.strftime("%Y-%m-%d %H:%M")}, "runs": runs}
    if args.peer_layers and "error" not in runs[0]:
        same = next(r for r in runs[1:] if r["layers"] == args.peer_layers and r["tool"] == "lowbit")
        result["ratio_per_layer"] = runs[0]["seconds"] / same["seconds"]
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
