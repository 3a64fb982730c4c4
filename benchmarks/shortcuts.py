"""True-sequential GPTQ over several calibration batches with and without the pipeline's shortcuts.

With more than one batch, each block is run once per linear group and once for its outputs; the
shortcuts (lowbit/pipeline/shortcuts.py) answer self_attn and the MLP from o_proj's and down_proj's
recorded inputs once those are solved. This quantizes the first blocks of a model both ways,
alternating, in one call, and reports the median time of each, their ratio and whether the
quantized weights are identical (they must be).

    python benchmarks/shortcuts.py --blocks 6 --samples 32 --seq-len 512 --batch-size 8 \
        --out benchmarks/results/shortcuts_cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lowbit.api import resolve_device
from lowbit.calibrate.data import calibration_windows, load_text
from lowbit.formats import IntegerFormat
from lowbit.models.architectures import architecture_of
from lowbit.models.loading import load_model
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.solvers.gptq import GPTQ

from common import DATA, add_device_argument, machine_of

FMT = IntegerFormat(bits=4, symmetric=False, group_size=128)


def quantize(model: torch.nn.Module, calibration: torch.Tensor, device: torch.device, batch_size: int,
             use_shortcuts: bool) -> tuple[float, dict[str, torch.Tensor]]:
    codes: dict[str, torch.Tensor] = {}
    quantizer = SequentialQuantizer(model, architecture_of(model), lambda name, linear: (FMT, GPTQ()), device=device,
                                    batch_size=batch_size, activations_on_device=True, use_shortcuts=use_shortcuts,
                                    on_quantized=lambda name, qweight: codes.__setitem__(name, qweight.codes))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    quantizer.run(calibration)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model id or folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--blocks", type=int, default=6, help="quantize the first N blocks (the rest are dropped)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json written)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    loaded = load_model(args.model, dtype="float32" if device.type == "cpu" else "bfloat16")
    layers = architecture_of(loaded.model).block_list(loaded.model)
    del layers[args.blocks:]
    loaded.model.config.num_hidden_layers = args.blocks
    calibration = calibration_windows(loaded.tokenizer, load_text(str(DATA / "valid.txt")), args.samples, args.seq_len, 0)
    times: dict[bool, list[float]] = {True: [], False: []}
    codes: dict[bool, dict[str, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for use_shortcuts in (False, True):
            seconds, codes[use_shortcuts] = quantize(copy.deepcopy(loaded.model), calibration, device,
                                                     args.batch_size, use_shortcuts)
            times[use_shortcuts].append(seconds)
    identical = codes[True].keys() == codes[False].keys() and all(
        torch.equal(codes[True][name], codes[False][name]) for name in codes[True])
    result = {"machine": machine_of(device), "blocks": args.blocks, "samples": args.samples, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "seconds_without": times[False], "seconds_with": times[True],
              "identical_codes": identical}
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    text = "\n".join([
        f"True-sequential GPTQ (int4 asym g128) of the first {args.blocks} blocks of "
        f"{args.model or 'SmolLM2-135M-Instruct (embedded)'}, {args.samples} x {args.seq_len} calibration tokens in "
        f"batches of {args.batch_size}, on {result['machine']}; median of {args.repeats} runs each, alternating.", "",
        "| pipeline | seconds (median) | runs | speed-up | same codes |", "|---|---:|---|---:|---|",
        f"| every pass runs the whole block | {without:.2f} | {', '.join(f'{t:.2f}' for t in times[False])} | 1.00x | |",
        f"| shortcuts (default) | {with_:.2f} | {', '.join(f'{t:.2f}' for t in times[True])} | "
        f"{without / with_:.2f}x | {'yes' if identical else 'NO'} |", ""])
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    if not identical:
        raise SystemExit("error: the shortcuts changed the quantized codes")


if __name__ == "__main__":
    main()
