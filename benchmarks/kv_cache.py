"""Quantized KV cache on SmolLM2-135M (weights in full precision): perplexity, KL and bytes per token.

Protocol (lowbit.evaluate.kv_protocol): the first --eval-windows non-overlapping --seq-len-token
windows of ../shared/data/wikitext-2/test.txt, each fed in chunks of --chunk tokens with one cache
carried across the chunks, so every token attends to earlier chunks through the cache (dequantized
beyond the full-precision window). The reference is the same model fed the same chunks through a
full-precision cache; KL(reference || row) per token. Bytes per token count packed codes, float16
scales and minimums, the fp16 window and (pre-RoPE) stored positions, at a context of --seq-len
tokens and at 32k tokens.

Rows are bits:group:residual[:pre] (pre = keys quantized before RoPE), or int8-token / fp8 (int8
or e4m3 codes with a float32 scale per token and head, kv/row_codes.py); the fp16 row is the
reference itself.

    python benchmarks/kv_cache.py                  # writes benchmarks/results/kv_cache.{json,md}
    python benchmarks/kv_cache.py --render         # rewrites the .md from the saved .json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_argument, machine_of  # noqa: E402

from lowbit.api import resolve_device  # noqa: E402
from lowbit.calibrate.data import load_text, tokenize_text  # noqa: E402
from lowbit.evaluate import ReferenceLogProbs, evaluate  # noqa: E402
from lowbit.evaluate.kv_protocol import DEFAULT_CHUNK, CacheScoring  # noqa: E402
from lowbit.kv import KVCacheSpec  # noqa: E402
from lowbit.kv.spec import ROW_KINDS  # noqa: E402
from lowbit.kv.memory import AttentionShape, bytes_per_token  # noqa: E402
from lowbit.models.loading import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
ROWS = ("8:64:128,4:64:128,4:64:0,4:64:128:pre,4:64:0:pre,"
        "2:64:128,2:64:0,2:64:128:pre,2:64:0:pre,2:32:128,2:32:128:pre")
LONG_CONTEXT = 32768
"""Second context length for bytes/token: where the full-precision window no longer matters."""


def parse_row(text: str) -> KVCacheSpec:
    """'4:64:128:pre' -> KVCacheSpec(bits=4, group_size=64, residual=128, pre_rope=True); 'fp8' and
    'int8-token' -> those caches."""
    if text in ROW_KINDS:
        return KVCacheSpec(kind=text)
    parts = text.split(":")
    if parts[3:] not in ([], ["pre"]) or len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise SystemExit(f"bad row {text!r}: expected bits:group:residual, bits:group:residual:pre, "
                         f"{' or '.join(ROW_KINDS)}")
    bits, group, residual = map(int, parts[:3])
    return KVCacheSpec(bits=bits, group_size=group, residual=residual, pre_rope=len(parts) == 4)


def label(spec: KVCacheSpec | None) -> str:
    if spec is None:
        return "fp16 (no quantization)"
    if spec.kind in ROW_KINDS:
        return {"fp8": "fp8 e4m3", "int8-token": "int8 symmetric"}[spec.kind] + ", scale per token and head"
    return f"int{spec.bits} g{spec.group_size} r{spec.residual}" + (" pre-RoPE" if spec.pre_rope else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--rows", default=ROWS, help="comma-separated bits:group:residual[:pre], int8-token or fp8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_cache")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md table from the saved .json")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown_table(saved["meta"], saved["rows"]))
        return
    specs = [parse_row(text) for text in args.rows.split(",")]  # bad rows fail before the model loads

    loaded = load_model(None)
    model = loaded.model.to(resolve_device(args.device))
    shape = AttentionShape.of_config(model.config)
    tokens = tokenize_text(loaded.tokenizer, load_text(str(DATA / "test.txt")))
    eval_kwargs = dict(seq_len=args.seq_len, max_windows=args.eval_windows)
    start = time.perf_counter()
    reference = ReferenceLogProbs(model, tokens, kv_cache=CacheScoring(None, args.chunk), **eval_kwargs)
    meta = describe_run(args, loaded, shape)
    rows = [row_of(shape, args.seq_len, None, reference.perplexity(), 0.0, time.perf_counter() - start)]
    for spec in specs:
        start = time.perf_counter()
        result = evaluate(model, tokens, reference=reference, kv_cache=CacheScoring(spec, args.chunk), **eval_kwargs)
        row = row_of(shape, args.seq_len, spec, result.perplexity, result.kl, time.perf_counter() - start)
        rows.append(row)
        print(f"{row['row']}: perplexity {row['perplexity']:.3f}, KL {row['kl']:.4f}, "
              f"{row['bytes_per_token']:.0f} bytes/token, {row['seconds']:.0f} s", flush=True)
        save(args, meta, rows)  # after every row, so a run cut short keeps its rows
    print(markdown_table(meta, rows))


def row_of(shape: AttentionShape, seq_len: int, spec: KVCacheSpec | None, perplexity: float, kl: float,
           seconds: float) -> dict:
    return {"row": label(spec), "spec": None if spec is None else spec.model_dump(),
            "perplexity": perplexity, "kl": kl,
            "bytes_per_token": bytes_per_token(shape, spec, seq_len),
            "bytes_per_token_long": bytes_per_token(shape, spec, LONG_CONTEXT),
            "fp16_bytes_per_token": bytes_per_token(shape, None, seq_len),
            "seconds": seconds}


def save(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown_table(meta, rows))


def describe_run(args: argparse.Namespace, loaded, shape: AttentionShape) -> dict:
    return {
        "model": f"{loaded.name}, weights float32 as loaded ({shape.layers} layers, {shape.kv_heads} KV heads of "
        f"{shape.head_dim})",
        "evaluation": f"first {args.eval_windows} non-overlapping windows of {args.seq_len} tokens of wikitext-2 "
        f"test.txt, fed in chunks of {args.chunk} tokens through the cache; reference: the same chunks through "
        "a full-precision cache",
        "machine": machine_of(args.device),
        "command": "python benchmarks/kv_cache.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "render")),
        "seq_len": args.seq_len,
    }


def markdown_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"Model: {meta['model']}. Evaluation: {meta['evaluation']}. Machine: {meta['machine']}. "
        f"Command: `{meta['command']}`.",
        "Rows: int bits, g = group size (tokens per key group, channels per value group), r = tokens kept in "
        "fp16; pre-RoPE = keys quantized before the rotary embedding; int8 symmetric / fp8 e4m3: 8-bit codes, a "
        "float32 scale per token and head. Bytes/token: everything the cache stores (codes, scales and minimums, "
        "fp16 window, pre-RoPE positions), summed over layers.",
        "",
        f"| KV cache | perplexity | KL to fp16 cache | bytes/token @ {meta['seq_len']} | bytes/token @ {LONG_CONTEXT} "
        "| x smaller @ 32k | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["fp16_bytes_per_token"] / row["bytes_per_token_long"]
        kl = "0 (reference)" if row["spec"] is None else f"{row['kl']:.4f}"
        lines.append(f"| {row['row']} | {row['perplexity']:.3f} | {kl} | {row['bytes_per_token']:.0f} | "
                     f"{row['bytes_per_token_long']:.0f} | {ratio:.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
