"""Programmatic dependent launch (PDL, sm_90 and later): a kernel starts while the one before it ends.

A batch-1 decode step is a chain of about 300 kernels, most of them a few microseconds long, and
each one's programs are scheduled only after the previous kernel has completed. Launched with PDL
(Triton's `launch_pdl=True`), a kernel's programs may be scheduled as soon as every program of the
kernel before it has called `launch_dependents` (or exited). They first do what needs none of its
results (the GEMV prefetches its weight rows into L2, `w4a16_triton`), then `wait` until the
previous kernel has completed with its writes visible, and only then signal the next kernel: so at
most one kernel runs ahead, and a kernel launched without PDL (torch's, cuBLAS's) waits for ours as
usual. Where PDL is off, `wait_then_release` compiles to nothing and launches are plain.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs (and Triton builds without the CUDA extras): never enabled
    triton = None

_switched_on = os.environ.get("LOWBIT_PDL", "1") != "0"
_capable: dict[int, bool] = {}


def enabled(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: a CUDA GPU of compute capability 9.0 or later, not
    under Triton's interpreter, and neither LOWBIT_PDL=0 nor `disabled()` in force."""
    if not (_switched_on and triton is not None and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capable[index]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Plain launches within the block: for timing a kernel on its own (the kernel table), and for
    comparing a decode step with and without PDL in one process."""
    global _switched_on
    saved, _switched_on = _switched_on, False
    try:
        yield
    finally:
        _switched_on = saved


if triton is not None:
    @triton.jit
    def wait_then_release(PDL: tl.constexpr):
        """Wait for the previous kernel's writes, then let the next kernel's programs be scheduled.
        Everything before this call may read only what no earlier kernel in the stream writes."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(addresses, row_bytes, mask):
        """Ask L2 for `row_bytes` (a multiple of 16) from each of `addresses` (16-byte aligned) where
        `mask`: one bulk prefetch per row (sm_90), nothing waits for it."""
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [addresses, mask.to(tl.int32), tl.zeros(mask.shape, tl.int32) + row_bytes], dtype=tl.int32,
            is_pure=False, pack=1)
