"""llm-compressor side of `lowbit compare`; runs in llm-compressor's own Python environment.

llm-compressor pins older transformers/compressed-tensors than lowbit uses, so it runs in a
separate interpreter and this file imports nothing from lowbit. It

  1. loads the original model that lowbit saved (save_pretrained folder, float32),
  2. runs `oneshot` on the calibration windows lowbit hands it (a [samples, seq_len] int64 tensor),
     with GPTQModifier, or AWQModifier followed by QuantizationModifier, on every Linear but lm_head,
     and times only that call,
  3. makes each quantized Linear hold its quantize-dequantize weight (GPTQ already leaves it so;
     otherwise it is computed from the module's own scale and zero point with compressed-tensors'
     fake_quantize), checks the number of distinct values per group,
  4. saves every tensor that differs from the original (quantized weights; AWQ also rescales norms)
     as safetensors, with a JSON of timings, settings and versions.

It is run by path, so its folder comes first on sys.path: no module beside it may be named after a
package it imports (hence hqq_peer.py and llmcompressor_peer.py).

    python llmcompressor_worker.py --model-dir DIR --windows W.pt --out-dir OUT --algorithm gptq --bits 4 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--windows", required=True, help=".pt file with a [samples, seq_len] int64 tensor")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--algorithm", choices=["gptq", "awq"], required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, required=True, help="-1: one scale per output channel")
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, fake_quantize
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    windows = torch.load(args.windows)
    if windows.dtype != torch.int64 or windows.ndim != 2:
        raise SystemExit(f"expected a [samples, seq_len] int64 tensor, got {windows.dtype} {tuple(windows.shape)}")
    samples, seq_len = windows.shape
    dataset = datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    if args.group_size == -1:
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.symmetric, strategy="channel")
    else:
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.symmetric, strategy="group",
                                   group_size=args.group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    notes: list[str] = []
    if args.algorithm == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None, block_size=128,
                               dampening_frac=0.01)]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        if not torch.cuda.is_available():
            # AWQ pins its cached activations in page-locked memory to speed up copies to a GPU,
            # which fails without one; pinning changes no value, so on a CPU-only machine it is skipped.
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
            notes.append("AWQ activation cache not pinned (no accelerator)")

    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False, pipeline="sequential", output_dir=None)
    seconds = time.perf_counter() - start

    quantized, dequantized_here, max_levels = [], 0, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float()
        zero = getattr(module, "weight_zero_point", None)
        qdq = fake_quantize(w, module.weight_scale.detach().float(), None if zero is None else zero.detach(),
                            module.quantization_scheme.weights)
        if float((qdq - w).abs().max()) > 1e-6 * max(float(w.abs().max()), 1.0):
            dequantized_here += 1  # the tool kept float weights next to its scales (plain QuantizationModifier)
        module.weight.data = qdq.to(module.weight.dtype)
        group = w.shape[1] if args.group_size == -1 else args.group_size
        first_groups = qdq[:4, :group]
        max_levels = max(max_levels, max(len(torch.unique(row)) for row in first_groups))
        quantized.append(name)
    if not quantized:
        raise SystemExit("llm-compressor quantized no Linear layer")
    if max_levels > 2**args.bits:
        raise SystemExit(f"weights are not {args.bits}-bit: a group has {max_levels} distinct values")

    changed = {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
        if name in original and tensor.shape == original[name].shape and not torch.equal(tensor, original[name])
    }
    os.makedirs(args.out_dir, exist_ok=True)
    save_file(changed, os.path.join(args.out_dir, "weights.safetensors"))
    result = {
        "oneshot_seconds": seconds,
        "quantized": quantized,
        "dequantized_by_worker": dequantized_here,
        "threads": torch.get_num_threads(),
        "settings": {"algorithm": args.algorithm, "bits": args.bits, "group_size": args.group_size,
                     "symmetric": args.symmetric, "ignore": ["lm_head"], "pipeline": "sequential",
                     "samples": samples, "seq_len": seq_len,
                     "modifiers": [type(m).__name__ for m in recipe], "notes": notes},
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }
    with open(os.path.join(args.out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
