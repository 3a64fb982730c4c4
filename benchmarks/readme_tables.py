"""Copy the saved benchmark tables (benchmarks/results/*.md) into the README between its markers.

    python benchmarks/readme_tables.py

The README shows exactly what the scripts wrote; nothing is typed in by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TABLES = {  # results file -> heading in the README
    "foundation.md": "RTN vs GPTQ on SmolLM2-135M (`python benchmarks/foundation.py`)",
    "foundation_2048.md": "RTN vs GPTQ with 128 x 2048 calibration tokens, one H200 "
    "(`JOBS=foundation_2048 bash benchmarks/gpu_accuracy_all.sh`)",
    "gptq_ranges.md": "GPTQ group ranges: the paper's vs fitted on the original weights, with MSE clipping "
    "(`python benchmarks/gptq_ranges.py --samples 32`)",
    "method_library.md": "The method library: weight-only methods, number formats, rotations, weights and "
    "activations, KV caches, each against RTN (`python benchmarks/method_library.py`, from the per-topic results of "
    "weight_only_methods.py, formats.py, rotations.py, activations.py and kv_cache.py)",
    "extreme_low_bits.md": "Extreme low bits: scalar GPTQ, dense-and-sparse, binarization and VQ, each with and "
    "without EoRA (`python benchmarks/extreme_low_bits.py`, `python benchmarks/vq.py`; "
    "plot: benchmarks/results/extreme_low_bits.png)",
    "speed_vs_llmcompressor.md": "Quantization time vs llm-compressor (`python benchmarks/speed_vs_llmcompressor.py`)",
    "gpu_quant_speed.md": "GPTQ on a Llama-3-8B-shaped model, one H100 (`python benchmarks/gpu_quant_speed.py`)",
    "gpu_quant_speed_vs_llmcompressor.md": "GPU GPTQ time vs llm-compressor (`python benchmarks/gpu_quant_speed.py`)",
    "gpu_quant_speed_vs_llmcompressor_h200.md": "GPU GPTQ time vs llm-compressor, one H200, 32 layers in one call "
    "(`STEPS=peer bash benchmarks/gpu_run_all.sh`; in this run lowbit ran without transparent huge pages, "
    "llm-compressor with them)",
    "gpu_quant_speed_vs_llmcompressor_h200_own_defaults.md": "GPU GPTQ time vs llm-compressor, one H200, 32 layers "
    "in one call, each tool with its own defaults (`STEPS=peer bash benchmarks/gpu_run_all.sh`)",
    "gpu_quant_speed_h200_thp.md": "GPTQ on a Llama-3-8B-shaped model, one H200, with transparent huge pages "
    "as the CLI runs it (`THP_MEM_ALLOC_ENABLE=1 python benchmarks/gpu_quant_speed.py --layers 32`)",
    "gpu_quant_speed_h200_block_memory.md": "GPTQ on a Llama-3-8B-shaped model, one H200, with and without the "
    "pipeline's shortcuts (`python benchmarks/gpu_quant_speed.py --without-shortcuts`)",
    "gpu_kernels.md": "W4A16 matmul on one H100 (`lowbit bench kernels`)",
    "gpu_kernels_h200.md": "W4A16 matmul on one H200, all shapes in one call, FBGEMM installed "
    "(`STEPS=kernels bash benchmarks/gpu_run_all.sh`)",
    "gpu_marlin_h200.md": "W4A16 matmul against GPTQModel's Marlin kernel, one H200, FBGEMM installed "
    "(`python benchmarks/gpu_marlin.py --source gptqmodel-7.7.0/gptqmodel_ext/marlin`)",
    "gpu_quant_speed_ranges_h200.md": "The integer schemes' GPTQ (static groups + MSE clipping) vs the paper's, "
    "one H200 (`python benchmarks/gpu_quant_speed.py --layers 4 --ranges`)",
    "vq_decode_gpu.md": "VQ matmul (Triton kernel) vs bf16 cuBLAS, one H200 (`python benchmarks/vq.py --decode --device cuda`)",
    "gpu_decode.md": "Decode speed of an 8B-shaped model, int4 vs bf16, one H100 (`python benchmarks/gpu_decode.py`)",
    "gpu_decode_h200.md": "Decode speed of an 8B-shaped model, int4 vs bf16, one H200, FBGEMM installed, "
    "fused and module steps in one call (`python benchmarks/gpu_decode.py --profile`)",
    "gpu_decode_h200_prefix_attention.md": "Decode speed of an 8B-shaped model, int4 vs bf16, one H200, the fused "
    "step with attention over the written positions and with SDPA over the whole cache in one call "
    "(`python benchmarks/gpu_decode.py --steps fused fused-sdpa`)",
    "gpu_decode_h200_prefix_attention_1024.md": "The same with 1024 new tokens "
    "(`python benchmarks/gpu_decode.py --steps fused fused-sdpa --new 1024`)",
    "gpu_decode_h200_prompt2048.md": "Decode speed and the prompt's time, a 2048-token prompt, one H200: the "
    "prompt read in chunks and one position a step (`python benchmarks/gpu_decode.py --steps fused --prompt 2048`)",
    "gpu_decode_h200_qwen3.md": "Decode speed of a Qwen3-8B-shaped model, int4 vs bf16, one H200, a 512-token "
    "prompt (`python benchmarks/gpu_decode.py --family qwen3-8b --steps fused --prompt 512`)",
    "gpu_decode_h200_quantized_head.md": "Decode speed of an 8B-shaped model with lm_head in int4 too, one H200 "
    "(`python benchmarks/gpu_decode.py --steps fused --quantize-head`)",
    "gpu_decode_attention_h200_variants.md": "Decode attention of one 8B-shaped layer, lowbit against the masked "
    "SDPA, one H200 (`python benchmarks/gpu_decode_attention.py --variants 384:64 384:256 128:64 128:256 256:128` "
    "at commit 9e222db: TARGET_PROGRAMS:MIN_CHUNK, a minimum chunk since taken out; the product is 128:64)",
    "compare-smollm2/results.md": "`lowbit compare` on SmolLM2-135M (`bash benchmarks/compare_smollm2.sh`; "
    "plot: benchmarks/results/compare-smollm2/pareto.png)",
    "budget.md": "Mixed precision under a budget: knapsack plan (and + evolutionary refinement) vs uniform "
    "(`python benchmarks/budget.py --samples 32 --eval-windows 4 --bits 2,3,4 --groups 64,-1 --generations 12 ...`)",
    "streaming.md": "A model larger than the memory cap, streamed from disk (`python benchmarks/streaming.py`)",
}
START, END = "<!-- benchmark-table -->", "<!-- /benchmark-table -->"


def main() -> None:
    sections = [
        f"### {heading}\n\n{(RESULTS / name).read_text().strip()}\n"
        for name, heading in TABLES.items()
        if (RESULTS / name).is_file()
    ]
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n" + "\n".join(sections) + f"{END}"
    pattern = re.compile(re.escape(START) + r".*?(" + re.escape(END) + r"|$)", re.S)
    if START not in text:
        raise SystemExit(f"README.md has no {START} marker")
    if END in text:
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.replace(START, block, 1)
    readme.write_text(text)
    print(f"README.md: {len(sections)} table(s) updated")


if __name__ == "__main__":
    main()
