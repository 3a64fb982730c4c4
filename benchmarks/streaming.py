"""Streaming benchmark: quantize a synthetic Llama larger than the memory the process may use.

A random float16 Llama checkpoint (hidden 2048, MLP 5632, 16 heads / 4 KV heads, SmolLM2's
tokenizer and 49152-token vocabulary, untied head) is written to disk block by block; `lowbit
quantize --offload disk` then runs in a fresh process inside a memory cgroup (v1 or v2) capped
at --cap-gb, under `/usr/bin/time -v`, which reports the peak resident set. The same model loaded
whole (`--offload none`) under the same cap shows what the cap does to the usual path, and a
shallower model, streamed and loaded whole without a cap, shows that the streamed peak does not
grow with depth and that both paths write the same tensors.

    python benchmarks/streaming.py            # writes benchmarks/results/streaming.{json,md}
    python benchmarks/streaming.py --render   # rewrite the .md from the saved .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lowbit.models.loading import default_model_path

ROOT = Path(__file__).resolve().parents[1]
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


def llama_config(layers: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
        dtype="float16",
    )


def write_synthetic(folder: Path, layers: int, blocks_per_shard: int = 4) -> int:
    """Random float16 weights, written a few blocks per shard (never the whole model in memory);
    returns the bytes written."""
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = llama_config(layers, len(tokenizer))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    groups: list[list[str]] = [[n for n in shapes if not n.startswith("model.layers.")]]
    for first in range(0, layers, blocks_per_shard):
        prefixes = tuple(f"model.layers.{i}." for i in range(first, min(first + blocks_per_shard, layers)))
        groups.append([n for n in shapes if n.startswith(prefixes)])
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    folder.mkdir(parents=True)
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.float16)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


class MemoryCap:
    """A memory cgroup limiting the processes started inside it (a no-op with cap None)."""

    def __init__(self, cap_bytes: int | None) -> None:
        self.cap = cap_bytes
        self.path: Path | None = None
        if cap_bytes is None:
            return
        name = f"lowbit-streaming-{os.getpid()}"
        if (CGROUP_V1 / "memory.limit_in_bytes").is_file():
            self.path = CGROUP_V1 / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(cap_bytes))
            self.limit_file, self.peak_file = "memory.limit_in_bytes", "memory.max_usage_in_bytes"
        elif (CGROUP_V2 / "cgroup.controllers").is_file():
            self.path = CGROUP_V2 / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(cap_bytes))
            (self.path / "memory.swap.max").write_text("0")
            self.limit_file, self.peak_file = "memory.max", "memory.peak"
        else:
            raise SystemExit("no writable memory cgroup here; run as root or pass --cap-gb 0")

    def enter(self) -> None:
        """Runs in the child before exec: join the cgroup."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        if self.path is None:
            return None
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        if self.path is not None:
            self.path.rmdir()


def run_quantize(model: Path, out: Path, offload: str, cap_bytes: int | None, method: str,
                 extra: list[str]) -> dict:
    """One `lowbit quantize` in a fresh, capped process; peak RSS from /usr/bin/time -v."""
    cap = MemoryCap(cap_bytes)
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "lowbit.cli", "quantize", str(model),
               "--method", method, "--group-size", "128", "--offload", offload, "--no-eval",
               "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LOWBIT_DEBUG": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, preexec_fn=cap.enter)
    finally:
        seconds = time.perf_counter() - start
        cgroup_peak = cap.peak_bytes()
        cap.remove()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    status = re.search(r"Command terminated by signal (\d+)", done.stderr)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    if done.returncode == 0:
        outcome = "finished"
    elif status:
        outcome = f"killed by signal {status.group(1)}" + (" (out of memory)" if status.group(1) == "9" else "")
    else:
        outcome = errors[0] if errors else f"exit code {done.returncode}"
    if done.returncode != 0 and not status and not errors:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
    return {
        "offload": offload, "method": method, "cap_gb": None if cap_bytes is None else cap_bytes / 2**30,
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "cgroup_peak_mb": None if cgroup_peak is None else cgroup_peak / 2**20,
        "seconds": seconds, "exit_code": done.returncode, "outcome": outcome,
    }


def same_tensors(first: Path, second: Path) -> bool:
    """Do two exports hold the same tensors (their shard boundaries may differ)?"""

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as file:
                found.update(dict.fromkeys(file.keys(), shard))
        return found

    a, b = tensors(first), tensors(second)
    if a.keys() != b.keys():
        return False
    for name in a:
        with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36, help="depth of the large model")
    parser.add_argument("--small-layers", type=int, default=8, help="depth of the comparison model")
    parser.add_argument("--cap-gb", type=float, default=1.5, help="memory cgroup limit (0: none)")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--work", type=Path, help="folder for the synthetic models (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "streaming")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown_table(saved["meta"], saved["rows"]))
        return
    cap = int(args.cap_gb * 2**30) if args.cap_gb > 0 else None
    work = Path(tempfile.mkdtemp(prefix="lowbit-streaming-", dir=args.work))
    meta = {
        "model": "synthetic Llama, float16, hidden 2048, MLP 5632, 16 heads / 4 KV heads, vocab 49152, untied head",
        "method": f"{args.method} int4 sym g128 (`lowbit quantize MODEL --method {args.method} --group-size 128 "
                  "--offload disk|none --no-eval`)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB, torch {torch.__version__}",
        "command": "python benchmarks/streaming.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render", "work")),
    }
    rows = []
    try:
        for layers in (args.layers, args.small_layers):
            model = work / f"llama-{layers}"
            size = write_synthetic(model, layers)
            print(f"wrote {model}: {size / 2**30:.2f} GiB", flush=True)
            # Streamed with and without the cap at both depths; the whole model under the cap (large)
            # and without it (small, also to compare the exported tensors).
            whole = ("none", cap) if layers == args.layers else ("none", None)
            runs = [("disk", cap), ("disk", None), whole]
            for offload, limit in runs:
                out = work / f"out-{layers}-{offload}-{'capped' if limit else 'free'}"
                row = {"layers": layers, "checkpoint_gib": size / 2**30,
                       **run_quantize(model, out, offload, limit, args.method, [])}
                rows.append(row)
                print(json.dumps(row), flush=True)
                save(args, meta, rows)
            if layers == args.small_layers:
                meta["same_tensors"] = same_tensors(work / f"out-{layers}-disk-capped", work / f"out-{layers}-none-free")
                save(args, meta, rows)
            shutil.rmtree(model)
            for out in work.glob(f"out-{layers}-*"):
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(meta, rows))


def save(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown_table(meta, rows))


def markdown_table(meta: dict, rows: list[dict]) -> str:
    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    lines = [
        f"Model: {meta['model']}; weights random. Quantization: {meta['method']}.",
        f"Machine: {meta['machine']}. Command: `{meta['command']}`. Peak RSS from `/usr/bin/time -v`; "
        "the cgroup peak also counts the page cache of files read and written, which the kernel reclaims "
        "under the cap.",
        "",
        "| blocks | checkpoint (GiB, fp16) | path | memory cap (GiB) | peak RSS (MiB) | cgroup peak (MiB) | time (s) | outcome |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        path = "streamed (`--offload disk`)" if row["offload"] == "disk" else "whole model (`--offload none`)"
        cap = "none" if row["cap_gb"] is None else f"{row['cap_gb']:.2f}"
        lines.append(
            f"| {row['layers']} | {row['checkpoint_gib']:.2f} | {path} | {cap} | {mb(row['peak_rss_mb'])} | "
            f"{mb(row['cgroup_peak_mb'])} | {row['seconds']:.0f} | {row['outcome']} |"
        )
    if "same_tensors" in meta:
        verdict = "identical" if meta["same_tensors"] else "DIFFERENT"
        lines += ["", f"Streamed and whole-model exports of the {rows[-1]['layers']}-block model: {verdict} tensors "
                  "(compared tensor by tensor; shard boundaries differ)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
