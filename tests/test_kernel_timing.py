"""timing.graph_time_ms: the run-time choices' clock (GPU only; skips without CUDA)."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import timing

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
def test_graph_time_ranks_more_work_as_slower_and_is_per_call():
    small = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    large = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x_small = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    x_large = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    fast = timing.graph_time_ms(lambda: x_small @ small.T)
    slow = timing.graph_time_ms(lambda: x_large @ large.T)
    # 64x the bytes: a 128 MiB weight takes at least 128 MiB / 10 TB/s = 13 us per call.
    assert 0 <= fast < slow and slow > 0.013


@gpu
def test_autotune_bench_answers_in_the_autotuners_form():
    x = torch.randn(256, device="cuda")
    assert len(timing.autotune_bench(lambda: x.add_(1), quantiles=(0.5, 0.2, 0.8))) == 3
    assert isinstance(timing.autotune_bench(lambda: x.add_(1)), float)


@gpu
def test_each_timed_call_reads_its_data_from_device_memory():
    """A 24 MiB read fits L2 (50 MB on an H200, 40-50 MB on an H100), so without the flush it would
    be served from L2; after it, it cannot run faster than device memory allows (under 6 TB/s on
    either)."""
    data = torch.ones(6 << 20, device="cuda")
    assert timing.graph_time_ms(lambda: data.sum()) > data.nbytes / 6e12 * 1e3
