"""Time the packing of one Llama-3-8B-shaped decoder layer's int4 codes for an export.

Every quantized layer is packed into compressed-tensors' words while the pipeline waits
(api.quantize's on_quantized -> CompressedTensorsWriter.add_quantized). This times, side by side
on the same random codes, compressed-tensors' own `pack_to_int32` (what the export used) and
lowbit's `export.layout.pack_layer` (the whole layer's tensors, 4-bit words by
`int4_pack.pack_int4`), checks the words are equal, and reports medians over --repeats.

    python benchmarks/export_pack.py --out benchmarks/results/export_pack
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import llama3_8b_config  # noqa: E402

from lowbit.export.layout import pack_layer  # noqa: E402
from lowbit.formats.base import QuantizedWeight  # noqa: E402
from lowbit.formats.integer import IntegerFormat  # noqa: E402


def layer_shapes() -> dict[str, tuple[int, int]]:
    config = llama3_8b_config(LlamaConfig)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: writes .json and .md")
    args = parser.parse_args()
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (out_features, in_features) in layer_shapes().items():
        codes = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
        groups = in_features // 128
        qweight = QuantizedWeight(fmt, codes, torch.rand(out_features, groups, dtype=torch.float16) + 0.5,
                                  torch.randint(0, 16, (out_features, groups), generator=generator).to(torch.float16),
                                  torch.arange(in_features) // 128)
        signed = (codes.to(torch.int16) - 8).to(torch.int8)
        words = pack_layer(name, qweight)[1][f"{name}.weight_packed"]
        if not torch.equal(words, pack_to_int32(signed, 4)):
            raise SystemExit(f"{name}: lowbit's words differ from compressed-tensors'")
        theirs = median_seconds(lambda: pack_to_int32(signed, 4), args.repeats)
        ours = median_seconds(lambda: pack_layer(name, qweight), args.repeats)
        rows.append({"layer": name, "shape": [out_features, in_features], "pack_to_int32_s": theirs,
                     "pack_layer_s": ours})
    total_theirs = sum(r["pack_to_int32_s"] for r in rows)
    total_ours = sum(r["pack_layer_s"] for r in rows)
    lines = [f"Packing one Llama-3-8B-shaped decoder layer's int4 g128 codes for an export, CPU "
             f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
             f"threads); median of {args.repeats}. compressed-tensors: `pack_to_int32` of the codes alone; "
             "lowbit: `pack_layer`, the layer's every tensor (words checked equal).", "",
             "| layer | out x in | compressed-tensors pack_to_int32 (s) | lowbit pack_layer (s) |",
             "|---|---|---:|---:|"]
    lines += [f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['pack_to_int32_s']:.3f} | {r['pack_layer_s']:.3f} |"
              for r in rows]
    lines += [f"| **decoder layer** | | **{total_theirs:.3f}** | **{total_ours:.3f}** |", "",
              f"compressed-tensors / lowbit: {total_theirs / total_ours:.1f}x; over 32 layers "
              f"{32 * total_theirs:.1f} s against {32 * total_ours:.1f} s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
