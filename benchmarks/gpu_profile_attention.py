"""Hardware-counter profile of decode attention over a bf16 cache and over each coded cache.

Over an 8-bit cache decode_attention reads half the bytes of a bf16 cache, yet takes longer, and
three Gluon kernels with a fifth fewer instructions a tile were no faster (docs/gpu_notes.md,
round 21). Nsight Compute's stall reasons, occupancy and memory throughput say what bounds the
coded tile. One call each (after one outside the profiled range, which compiles) over an 8B-shaped
layer (32 query heads, 8 kv heads, head_dim 128) at batch 16 with a full 4096-position cache, the
three caches in turns inside cudaProfilerStart/Stop:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        python benchmarks/gpu_profile_attention.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lowbit.kernels import decode_attention
from lowbit.kv.row_codes import CODES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode_attention import HEAD_DIM, HEADS, KV_HEADS, coded_caches  # noqa: E402


def caches(batch: int, max_len: int) -> dict[str, tuple]:
    """q and the same random keys and values as a bf16 cache and as each coded cache, all written."""
    generator = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", generator=generator).to(torch.bfloat16)
    keys, values = (torch.randn(batch, KV_HEADS, max_len, HEAD_DIM, device="cuda", generator=generator)
                    .to(torch.bfloat16) for _ in range(2))
    written = torch.arange(max_len, device="cuda")
    return {"bf16": (q, keys, values)} | {kind: (q, *coded_caches(keys, values, written, kind)) for kind in CODES}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=4096)
    args = parser.parse_args()
    pos = torch.tensor([args.max_len - 1], device="cuda")
    calls = caches(args.batch, args.max_len)
    for args_of_call in calls.values():
        decode_attention.attend(*args_of_call, pos)  # compiled outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, args_of_call in calls.items():
        torch.cuda.nvtx.range_push(name)
        decode_attention.attend(*args_of_call, pos)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order:", ", ".join(calls))
