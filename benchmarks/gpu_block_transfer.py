"""How long moving one Llama-3-8B-shaped decoder block between CPU and GPU memory takes, by method.

GPTQ's pipeline streams each block to the GPU and back (pipeline/sequential.py); the H200 breakdown
put `Module.to` at 1.7 s over 4 blocks (gpu_quant_speed_4layers_h200.md), about a quarter of the
run, for 436 MB each way. This times, on one random bf16 block (medians of --repeats):

  * to GPU: `block.to("cuda")` from ordinary (pageable) CPU memory;
  * to CPU, new memory: `block.to("cpu")`, the copy into freshly allocated host memory;
  * to CPU, its own memory: the same bytes copied back into the CPU tensors the block came from;
  * to GPU while the GPU computes: the same copy made by a second thread on a second CUDA stream
    while the first keeps the GPU busy with bf16 matmuls, against the matmuls alone and the copy
    alone, to see whether the copy hides behind the compute.

    python benchmarks/gpu_block_transfer.py --out benchmarks/results/gpu_block_transfer_h200

With THP_MEM_ALLOC_ENABLE=1 in the environment torch's CPU allocator asks for transparent huge
pages for large tensors, which the table header records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_model import llama3_8b_config  # noqa: E402


def seconds(work, repeats: int) -> float:
    """Median wall time of `work()`, synchronised before and after."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tensors_of(block: torch.nn.Module) -> list[torch.Tensor]:
    return [p.data for p in block.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    block = LlamaDecoderLayer(llama3_8b_config(LlamaConfig), layer_idx=0).to(torch.bfloat16)
    cpu = tensors_of(block)
    megabytes = sum(t.numel() * t.element_size() for t in cpu) / 1e6
    on_gpu = [t.to("cuda") for t in cpu]
    compute_a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def to_gpu() -> None:
        for t in cpu:
            t.to("cuda")

    def to_new_cpu() -> None:
        for t in on_gpu:
            t.to("cpu")

    def to_own_cpu() -> None:
        for home, t in zip(cpu, on_gpu):
            home.copy_(t)

    def compute() -> None:
        for _ in range(40):
            compute_a @ compute_a

    side = torch.cuda.Stream()

    def to_gpu_beside_compute() -> None:
        def copy() -> None:
            with torch.cuda.stream(side):
                to_gpu()
            side.synchronize()

        worker = threading.Thread(target=copy)
        worker.start()
        compute()
        worker.join()

    rows = {
        "to GPU (pageable)": seconds(to_gpu, args.repeats),
        "to CPU, new memory": seconds(to_new_cpu, args.repeats),
        "to CPU, its own memory": seconds(to_own_cpu, args.repeats),
        "GPU matmuls alone": seconds(compute, args.repeats),
        "to GPU by a second thread while the matmuls run": seconds(to_gpu_beside_compute, args.repeats),
    }
    device = torch.cuda.get_device_name()
    lines = [f"Moving one random bf16 Llama-3-8B-shaped decoder block ({megabytes:.0f} MB) on {device} "
             f"(torch {torch.__version__}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}); "
             f"median seconds of {args.repeats}.", "",
             "| what | seconds | GB/s |", "|---|---:|---:|"]
    for name, value in rows.items():
        rate = "" if "alone" in name or "while" in name else f"{megabytes / 1e3 / value:.1f}"
        lines.append(f"| {name} | {value:.3f} | {rate} |")
    beside = rows["to GPU by a second thread while the matmuls run"]
    hidden = rows["to GPU (pageable)"] + rows["GPU matmuls alone"] - beside
    lines += ["", f"Copy time hidden behind the matmuls: {hidden:.3f} s of {rows['to GPU (pageable)']:.3f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"device": device, "megabytes": megabytes,
                                                             "seconds": rows}, indent=1))


if __name__ == "__main__":
    main()
