"""An int4 export of a random Llama-3-8B-shaped model, to time `lowbit generate` on a real export.

gpu_decode.py times decode on QuantLinear layers built in memory; this writes the same kind of
model as a user's export (every decoder Linear RTN int4 asymmetric group 128, compressed-tensors
pack-quantized, embedding and lm_head bf16) with a word-level tokenizer over the whole vocabulary
(word i is id i), so `lowbit generate OUT --prompt ...` reads it back onto its codes
(export/packed_load.py) as it would a real model. Built on the GPU where there is one.

    python benchmarks/gpu_export.py --out /tmp/int4-8b
    lowbit generate /tmp/int4-8b --prompt "w1 w2 w3" --new-tokens 128 --batch 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import FMT, build  # noqa: E402

from lowbit.export import CompressedTensorsWriter  # noqa: E402
from lowbit.formats.base import QuantizedWeight, quantize_matrix  # noqa: E402
from lowbit.formats.vector import VectorFormat  # noqa: E402

# FMT (gpu_decode.py's) keeps float16 scales, as the kernel table uses them: QuantLinear reads them as
# stored (the writer warns that a bf16 model's dense reload rounds them, which a speed run does not mind).


VQ_FMT = VectorFormat(dim=4, bits=8, row_scale=True)


def random_vq_weight(fmt: VectorFormat, weight: torch.Tensor) -> QuantizedWeight:
    """`weight`'s shape in `fmt`, with random codes and codebook: what a load reads, not a fit."""
    rows, columns = weight.shape
    generator = torch.Generator(device=weight.device).manual_seed(rows * 7 + columns)
    book = torch.randn(1, 1 << fmt.bits, fmt.dim, generator=generator, device=weight.device).half().float()
    codes = torch.randint(0, 1 << fmt.bits, (1, rows, columns // fmt.dim), generator=generator,
                          device=weight.device, dtype=torch.int32)
    return QuantizedWeight(format=dataclasses.replace(fmt, codebooks=(book,)), codes=codes,
                           scale=fmt.fit(weight).scale, zero=None,
                           group_index=torch.zeros(columns, dtype=torch.long, device=weight.device))


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word `w{i}` is token i; anything else is w0."""
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0")


@torch.no_grad()
def write_export(layers: int, out: Path, device: torch.device, kind: str = "int4") -> Path:
    """`kind` "int4": every decoder Linear RTN int4 (compressed-tensors); "vq": 8-bit codes of
    4-vectors (lowbit's layout), from one random codebook, for load timings only."""
    model = build(layers, device=device)  # gpu_decode.py's model: same seed, shapes and dtype
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith("model.layers.")]
    quantized = quantize_matrix if kind == "int4" else random_vq_weight
    with CompressedTensorsWriter(out) as writer:
        for name, module in tqdm(linears, desc=f"{kind} codes", unit="linear"):
            writer.add_quantized(name, quantized(FMT if kind == "int4" else VQ_FMT, module.weight.float()))
        quantized = {f"{name}.weight" for name, _ in linears}
        writer.add_tensors({key: value for key, value in model.state_dict().items() if key not in quantized})
        return writer.finish(model.config, word_tokenizer(model.config.vocab_size),
                             extra_metadata={"recipe": {"method": "rtn"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(write_export(args.layers, args.out, device))


if __name__ == "__main__":
    main()
