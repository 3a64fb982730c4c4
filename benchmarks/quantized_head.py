"""What quantizing the output head costs on SmolLM2-135M: GPTQ with lm_head kept in 16 bits
(the default) and quantized like the blocks (`lowbit quantize --quantize-head`), side by side.

SmolLM2-135M ties its head to the input embedding: 28.3M of its 134.5M parameters. Quantizing the
head unties it (the embedding stays exact), so the model holds one more matrix, in few bits.
Same protocol as benchmarks/foundation.py (calibration windows of wikitext-2 valid.txt, the
first --eval-windows 2048-token windows of test.txt, perplexity and KL to the original); every row
starts from the same original weights. "weights MB" counts every parameter once (a tied matrix
once), quantized layers at their bits per weight (scales and zero points included), the rest at
16 bits.

    python benchmarks/quantized_head.py      # writes benchmarks/results/quantized_head.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.evaluate import evaluate

from common import add_device_argument, embedded_model_protocol, machine_of
from weight_only_methods import quantize_copy, recipe_for

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "4:128,4:-1,3:64"
"""bits:group (-1 per channel). The blocks' width 576 takes no group of 128 (auto falls to 64);
the head reads 576 too, so g128 is per-channel-like there as well: `auto` picks per layer."""


def weight_megabytes(model, quantized: set[str], bits_per_weight: float) -> float:
    """Every parameter once (named_parameters yields a tied tensor once): the `quantized` layers'
    weights at `bits_per_weight` (their average), the rest at 16 bits."""
    bits = sum((bits_per_weight if name.removesuffix(".weight") in quantized else 16.0) * parameter.numel()
               for name, parameter in model.named_parameters())
    return bits / 8 / 1e6


def run_row(protocol, bits: int, group_size: int, head: bool) -> dict:
    recipe = recipe_for("gptq-static-mse", bits, "auto" if group_size == 128 else group_size)
    if head:
        recipe = recipe.model_copy(update={"ignore": []})
    model, seconds, bits_per_weight = quantize_copy(protocol.original, recipe, protocol.calibration, protocol.device,
                                                    quantize_head=head)
    quantized = {name for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or head)}
    result = evaluate(model, protocol.test_tokens, reference=protocol.reference, **protocol.eval_kwargs)
    row = {"bits": bits, "group_size": group_size, "head": "quantized" if head else "16-bit",
           "perplexity": result.perplexity, "kl": result.kl,
           "weights_mb": weight_megabytes(model, quantized, bits_per_weight), "seconds": seconds}
    print(row, flush=True)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"GPTQ (static groups, MSE ranges) on {meta['model']}, lm_head kept in 16 bits or quantized like the "
             f"blocks (benchmarks/quantized_head.py); {meta['calibration']}; {meta['evaluation']}; {meta['machine']}. "
             f"Original: perplexity {meta['original_perplexity']:.3f}, weights {meta['original_mb']:.1f} MB.", "",
             "| bits | group | lm_head | perplexity | KL to original | weights MB | quantize s |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        group = "channel" if r["group_size"] == -1 else ("auto (128/64)" if r["group_size"] == 128 else r["group_size"])
        lines.append(f"| {r['bits']} | {group} | {r['head']} | {r['perplexity']:.3f} | {r['kl']:.4f} | "
                     f"{r['weights_mb']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--settings", default=SETTINGS, help="comma-separated bits:group_size (-1 = per channel)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantized_head")
    add_device_argument(parser)
    args = parser.parse_args()
    protocol = embedded_model_protocol(args.samples, args.seq_len, args.eval_windows, args.device)
    meta = {"model": protocol.loaded.name, "machine": machine_of(protocol.device),
            "calibration": f"{args.samples} x {args.seq_len} calibration tokens",
            "evaluation": f"{args.eval_windows} x 2048 evaluation tokens",
            "original_perplexity": protocol.reference.perplexity(),
            "original_mb": weight_megabytes(protocol.original, set(), 16.0)}
    rows = []
    for setting in args.settings.split(","):
        bits, group_size = map(int, setting.split(":"))
        for head in (False, True):
            rows.append(run_row(protocol, bits, group_size, head))
            args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            args.out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
