"""GPU time of one kernel call as a CUDA-graph-replayed decode loop sees it: no launch cost, cold L2.

The autotuner and the W4A16 dispatcher both rank candidates by time. Timing eager calls
(`triton.testing.do_bench`) counts the CPU's launch cost whenever that exceeds the kernel's own
time, as it does for a few-microsecond GEMV behind Triton's Python launcher: the ranking then
measured launchers, not kernels (an H200 run chose FBGEMM at 15 us over a 9 us fused GEMV). Here
the call is replayed from a CUDA graph, as in lowbit's decode loop, after a buffer of twice L2's
size is read, so every replay reads its weight from device memory into an L2 of clean lines, as it
would after the other layers' weights passed through L2; the flushes alone are timed the same way
and subtracted. Zeros written over the buffer instead leave L2 dirty, and each line a call brings
in first writes one back to DRAM: on an H200 that made bf16 cuBLAS 8-25% slower on the 8B-shaped
layers at M = 1 and 16 and lowbit's kernels up to 19% (gpu_flush_kind_h200.md), a cost no decode
step pays. (`lowbit bench kernels` needs no flush: each call there reads its own weight copy.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

CALLS_PER_GRAPH = 10
REPLAYS = 5

_FLUSH: dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the L2 cache in bytes, kept per device (64 MiB where the size is not reported): read
    whole, it leaves no line of the timed call's weight in L2."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _FLUSH:
        l2_bytes = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or (32 << 20)
        _FLUSH[index] = torch.empty(2 * l2_bytes // 4, dtype=torch.int32, device=f"cuda:{index}")
    return _FLUSH[index]


def graph_replay_ms(calls: Sequence[Callable[[], object]], replays: int = REPLAYS) -> float:
    """Median milliseconds of one replay of a CUDA graph that runs `calls` in order (each already
    called once eagerly: nothing can compile or autotune inside a capture)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_time_ms(call: Callable[[], object], device: torch.device | None = None,
                  flush: Callable[[], object] | None = None) -> float:
    """Milliseconds per call of `call` with a cold L2, launch cost excluded.

    `call` runs once eagerly first, so compilation, autotuning and lazily built layouts happen
    outside the capture (and errors such as a config out of shared memory raise there). `flush`
    empties L2 before each call (its own time subtracted): by default a read of twice L2's size,
    which leaves L2 holding clean lines; benchmarks/gpu_flush_kind.py passes others to compare.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    flush = flush or _flush_buffer(device).max
    call()
    torch.cuda.synchronize(device)

    def flushed_call() -> None:
        flush()
        call()

    with_call = graph_replay_ms([flushed_call] * CALLS_PER_GRAPH)
    flush_only = graph_replay_ms([flush] * CALLS_PER_GRAPH)
    return max(with_call - flush_only, 0.0) / CALLS_PER_GRAPH


def autotune_bench(kernel_call: Callable[[], None], quantiles=None) -> float | list[float]:
    """`graph_time_ms` in the form triton.autotune's `do_bench` argument takes."""
    ms = graph_time_ms(kernel_call)
    return ms if quantiles is None else [ms] * len(quantiles)
