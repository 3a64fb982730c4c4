"""llm-compressor side of benchmarks/speed_vs_llmcompressor.py; runs inside .venv-llmcompressor.

lowbit is not importable here on purpose: this script only uses llm-compressor 0.14, compressed-tensors,
transformers and torch from that environment. It

  1. loads the model from its GGUF file in float32 on the CPU (GGUF-dequantized, flagged as a plain
     model the way lowbit's loader does it),
  2. builds a `datasets.Dataset` of input_ids/attention_mask from the calibration windows the driver
     saved (a [samples, seq_len] int64 tensor in a .pt file),
  3. runs `oneshot` with a GPTQModifier (int4 asymmetric, group size 64, Linear layers, lm_head ignored)
     and times only that call,
  4. checks that every quantized Linear now holds fake-quantized (quantize-dequantize) weights, i.e.
     that QDQ with the module's own scale/zero point reproduces it, and saves those dense weights as
     safetensors with a JSON of timings and versions.

llm-compressor 0.14's GPTQ, as read from its source: the "sequential" pipeline (what the default
"independent" pipeline picks for GPTQ) traces the model into one subgraph per decoder layer; each
subgraph gets one calibration pass over every batch (a Hessian per Linear, accumulated by forward hooks
with x xᵀ, so q/k/v and gate/up each build their own), then all of the layer's Linears are solved, then a
second pass over every batch with the quantized weights produces the next layer's inputs. Group scales
and zero points come from a memoryless min-max observer on the layer's original weights before the
solve (static groups). Defaults: block_size 128, dampening_frac 0.01 (of mean diag H),
actorder "static" unless set; batch_size 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

START = time.perf_counter()

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="folder holding the GGUF file")
    parser.add_argument("--gguf-file", required=True)
    parser.add_argument("--windows", required=True, help=".pt file with a [samples, seq_len] int64 tensor")
    parser.add_argument("--out-dir", required=True, help="writes weights.safetensors and result.json here")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--actorder", choices=["none", "static"], default="none",
                        help="GPTQModifier.actorder (llm-compressor's own default is static)")
    parser.add_argument("--batch-size", type=int, default=1, help="oneshot batch_size (its default is 1)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening-frac", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file, dtype=torch.float32)
    # The GGUF is dequantized on load but transformers still flags the model as quantized; drop the
    # flag (as lowbit's loader does) so llm-compressor treats it as the plain float32 model it is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.float32).eval()
    # oneshot re-reads the config from model.config.name_or_path; the GGUF folder has no config.json.
    config_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    load_seconds = time.perf_counter() - load_start

    windows = torch.load(args.windows)
    if windows.dtype != torch.int64 or windows.ndim != 2:
        raise SystemExit(f"expected a [samples, seq_len] int64 tensor in {args.windows}, got {windows.dtype} "
                         f"{tuple(windows.shape)}")
    samples, seq_len = windows.shape
    dataset = datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )

    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=args.symmetric, strategy="group", group_size=args.group_size
    )
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=args.block_size,
        dampening_frac=args.dampening_frac,
        actorder=None if args.actorder == "none" else args.actorder,
    )

    threads = torch.get_num_threads()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = time.process_time()
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,  # every window once, in the driver's order
        batch_size=args.batch_size,
        pipeline="sequential",
        output_dir=None,
    )
    oneshot_seconds = time.perf_counter() - start
    shutil.rmtree(config_dir, ignore_errors=True)
    oneshot_cpu_seconds = time.process_time() - cpu_start
    usage_after = resource.getrusage(resource.RUSAGE_SELF)

    # Collect the dense weights and check that they are already quantize-dequantized.
    tensors: dict[str, torch.Tensor] = {}
    worst_qdq_gap = 0.0
    requantized_layers = 0
    max_levels = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float().cpu()
        scale = module.weight_scale.detach()
        zero = getattr(module, "weight_zero_point", None)
        qargs = module.quantization_scheme.weights
        requantized = fake_quantize(w, scale.float(), None if zero is None else zero.detach(), qargs)
        gap = float((requantized - w).abs().max())
        worst_qdq_gap = max(worst_qdq_gap, gap)
        if gap > 1e-6 * max(float(w.abs().max()), 1.0):
            # Not QDQ values (an llm-compressor that keeps the float weights): dequantize ourselves.
            w = requantized
            requantized_layers += 1
        groups = w.reshape(w.shape[0], -1, args.group_size)
        max_levels = max(max_levels, max(len(torch.unique(g)) for g in groups[:4, 0]))
        tensors[f"{name}.weight"] = w.contiguous()
    if not tensors:
        raise SystemExit("llm-compressor quantized no Linear layer")
    if max_levels > 2**args.bits:
        raise SystemExit(f"weights are not {args.bits}-bit: a group has {max_levels} distinct values")

    os.makedirs(args.out_dir, exist_ok=True)
    save_file(tensors, os.path.join(args.out_dir, "weights.safetensors"))
    result = {
        "tool": "llm-compressor",
        "oneshot_seconds": oneshot_seconds,
        "oneshot_cpu_seconds": oneshot_cpu_seconds,
        "oneshot_system_cpu_seconds": usage_after.ru_stime - usage.ru_stime,
        "oneshot_minor_page_faults": usage_after.ru_minflt - usage.ru_minflt,
        "model_load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - START,
        "quantized_linears": len(tensors),
        "qdq_max_abs_gap": worst_qdq_gap,
        "layers_dequantized_by_worker": requantized_layers,
        "settings": {
            "scheme": f"int{args.bits} {'sym' if args.symmetric else 'asym'} group {args.group_size}",
            "targets": ["Linear"], "ignore": ["lm_head"], "actorder": args.actorder,
            "block_size": args.block_size, "dampening_frac": args.dampening_frac,
            "batch_size": args.batch_size, "pipeline": "sequential",
            "samples": samples, "seq_len": seq_len, "weight_observer": "memoryless_minmax (default)",
        },
        "torch_threads": threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "lowbit_importable": _lowbit_importable(),
    }
    with open(os.path.join(args.out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("oneshot_seconds", "total_seconds", "quantized_linears")}))


def _lowbit_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("lowbit") is not None


if __name__ == "__main__":
    sys.exit(main())
