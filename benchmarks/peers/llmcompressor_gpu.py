"""llm-compressor side of benchmarks/gpu_quant_speed.py: GPTQ W4A16 of a random Llama-3-8B-shaped model.

Runs in its own process with llm-compressor 0.14 (and its pinned transformers) first on sys.path;
lowbit is not imported. Builds the same model as the driver (same config, seed, bf16), leaves it in
CPU memory, and times `oneshot` with a GPTQModifier (int4 asymmetric, group 128, every Linear but
lm_head, actorder off, the defaults otherwise) on the driver's calibration tokens with the sequential
pipeline, which onloads one decoder layer at a time to the GPU. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--tokens", required=True, help=".pt file with a [samples, seq_len] int64 tensor")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    import datasets
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, __file__.rsplit("/", 2)[0])
    from gpu_model import llama3_8b_config, random_model  # noqa: E402  (benchmarks/gpu_model.py)

    model = random_model(llama3_8b_config(LlamaConfig, args.layers), LlamaForCausalLM)
    # oneshot insists on a processor when given a dataset; the tokens are already ids, so a
    # one-word tokenizer (built offline) satisfies it without touching the data.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        unk_token="<unk>", pad_token="<unk>")
    config_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    tokens = torch.load(args.tokens)
    samples, seq_len = tokens.shape
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128)
    modifier = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"], actorder=None)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=dataset, recipe=modifier, num_calibration_samples=samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=args.batch_size,
            pipeline="sequential", output_dir=None)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    quantized = sum(1 for m in model.modules() if hasattr(m, "weight_scale"))
    print(json.dumps({
        "tool": "llm-compressor", "seconds": seconds, "layers": args.layers, "quantized_linears": quantized,
        "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9, "batch_size": args.batch_size,
        "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
