"""Triton autotuning as lowbit's kernels use it: candidates compiled on a thread pool, timed as
CUDA-graph replays (timing.py), and each shape's choice kept on disk for later processes.

A kernel's first call per shape compiles and times every candidate config. Compiling them one
after another at their first launch was most of the first minute of `lowbit generate` on an
8B-shaped export (56.9 s of warm-up; 22.8 s on a 16-thread pool; 0.9 s in a second run that
finds the choices on disk: benchmarks/results/gpu_generate_h200_warmup_*.log).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.runtime.autotuner import Autotuner

from lowbit.kernels.timing import autotune_bench


def compile_threads() -> int:
    """Threads that compile a shape's candidates (LOWBIT_COMPILE_THREADS, default: the CPU count up to 16)."""
    value = os.environ.get("LOWBIT_COMPILE_THREADS", "")
    if not value:
        return min(16, os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LOWBIT_COMPILE_THREADS={value!r}: give a whole number of threads, 1 or more")
    return int(value)


class ParallelCompileAutotuner(Autotuner):
    """Triton's autotuner, compiling a shape's candidates on a thread pool before it times them.

    Where the shape's tuning is not on disk yet (`check_disk_cache` is about to time every
    candidate), they are compiled in parallel first (Triton's AsyncCompileMode), and timing then
    finds them built. A candidate that fails to compile is left to the timing, which scores it as
    never winning.
    """

    _launch: tuple[tuple, dict] | None = None

    def run(self, *args, **kwargs):
        self._launch = args, kwargs
        try:
            return super().run(*args, **kwargs)
        finally:
            self._launch = None

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        def compile_then_time():
            threads = compile_threads()
            if threads > 1:
                args, kwargs = self._launch  # kwargs: the launch's grid and constexprs
                with ThreadPoolExecutor(threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
                    for config in configs:
                        self.fn.run(*args, **{**kwargs, **config.all_kwargs(), "warmup": True})
            bench_fn()

        return super().check_disk_cache(tuning_key, configs, compile_then_time)


def autotune(configs: list[triton.Config], key: list[str], prune: Callable, kernel) -> Autotuner:
    """`kernel` tuned per `key` over `configs`, pruned to the shape by `prune` (early_config_prune).

    Where Triton can (3.4 and later), each shape's timings are kept in Triton's cache directory,
    keyed by the kernel's source, the GPU architecture and the candidate list; where it has
    AsyncCompileMode too (3.5), a shape's first tuning compiles its candidates in parallel.
    """
    prune_by = {"early_config_prune": prune}
    if hasattr(triton, "AsyncCompileMode") and hasattr(Autotuner, "check_disk_cache"):
        return ParallelCompileAutotuner(kernel, kernel.arg_names, configs, key, None, None, prune_configs_by=prune_by,
                                        do_bench=autotune_bench, cache_results=True)
    disk_cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=key, prune_configs_by=prune_by, do_bench=autotune_bench, **disk_cache)(kernel)
