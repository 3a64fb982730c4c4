"""Triton autotuning as lowbit's kernels use it: candidates compiled on a thread pool, timed as
CUDA-graph replays (timing.py), and each shape's choice kept on disk for later processes.

A kernel's first call per shape compiles and times every candidate config. Compiling them one
after another at their first launch was most of the first minute of `lowbit generate` on an
8B-shaped export (56.9 s of warm-up; 22.8 s on a 16-thread pool; 0.9 s in a second run that
finds the choices on disk: benchmarks/results/gpu_generate_h200_warmup_*.log).
"""

from __future__ import annotations

import contextlib
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


FINALISTS = 4
FINALIST_MARGIN = 1.15
REFINE_ROUNDS = 5
"""After every candidate is timed once, up to FINALISTS that came within FINALIST_MARGIN of the
fastest are timed REFINE_ROUNDS more times, in turns, and ranked by their medians. One timing of a
few-microsecond kernel is the difference of two graph replays of about forty times its length
(timing.py flushes L2 between calls), and varies by about a tenth: an H200 run took a GEMV tile
at 7.5 us for 8B q/o_proj where another run's choice took 6.7 (gpu_kernels_h200_before_finalists.md
against gpu_kernels_h200_m1_pipeline.md)."""


def _first(timing) -> float:
    """A timing as Triton's autotuner keeps it: one number, or several quantiles led by the median."""
    return timing[0] if isinstance(timing, (list, tuple)) else timing


class ParallelCompileAutotuner(Autotuner):
    """Triton's autotuner, compiling a shape's candidates on a thread pool before it times them,
    and timing its finalists again before it chooses.

    Where the shape's tuning is not on disk yet (`check_disk_cache` is about to time every
    candidate), they are compiled in parallel first (Triton's AsyncCompileMode), and timing then
    finds them built. A candidate that fails to compile is left to the timing, which scores it as
    never winning. The finalists' repeated timings are what goes to disk.

    `finalist_variants` (config -> its other settings, which the kernel's prune may drop) names
    settings that are tried on the finalists only: the first round times each candidate in its
    base setting, and the finalists' variants, compiled then, join the repeated timings.
    """

    _launch: tuple[tuple, dict] | None = None
    finalist_variants: Callable[[triton.Config], list[triton.Config]] | None = None

    def run(self, *args, **kwargs):
        self._launch = args, kwargs
        try:
            return super().run(*args, **kwargs)
        finally:
            self._launch = None

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        def compile_then_time():
            self._compile_all(configs)
            bench_fn()
            self._time_finalists_again(tuning_key)

        return super().check_disk_cache(tuning_key, configs, compile_then_time)

    def _compile_all(self, configs: list[triton.Config]) -> None:
        threads = compile_threads()
        if threads > 1 and configs:
            args, kwargs = self._launch  # kwargs: the launch's grid and constexprs
            with ThreadPoolExecutor(threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
                for config in configs:
                    self.fn.run(*args, **{**kwargs, **config.all_kwargs(), "warmup": True})

    def _variants_of(self, finalists: list[triton.Config], kwargs: dict) -> list[triton.Config]:
        """The finalists' variants that fit the shape and were not timed yet."""
        if self.finalist_variants is None:
            return []
        offered = [variant for config in finalists for variant in self.finalist_variants(config)]
        fitting = self.early_config_prune(offered, self.nargs, **kwargs) if offered else []
        return [variant for variant in dict.fromkeys(fitting) if variant not in self.configs_timings]

    def _time_finalists_again(self, tuning_key) -> None:
        timings = self.configs_timings
        fastest = min(_first(t) for t in timings.values())
        finalists = sorted((c for c, t in timings.items() if _first(t) <= fastest * FINALIST_MARGIN),
                           key=lambda c: _first(timings[c]))[:FINALISTS]
        args, kwargs = self._launch
        variants = self._variants_of(finalists, kwargs)
        self._compile_all(variants)
        finalists += variants
        if len(finalists) < 2:
            return
        rounds = {config: [] for config in finalists}
        for _ in range(REFINE_ROUNDS):
            for config in finalists:  # in turns, so a drift in the GPU's clocks touches all alike
                rounds[config].append(self._bench(*args, config=config, **kwargs))
        for config, results in rounds.items():
            timings[config] = sorted(results, key=_first)[len(results) // 2]
        self.cache[tuning_key] = min(timings, key=lambda c: _first(timings[c]))  # as a later process will


def autotune(configs: list[triton.Config], key: list[str], prune: Callable, kernel,
             finalist_variants: Callable[[triton.Config], list[triton.Config]] | None = None) -> Autotuner:
    """`kernel` tuned per `key` over `configs`, pruned to the shape by `prune` (early_config_prune).

    Where Triton can (3.4 and later), each shape's timings are kept in Triton's cache directory,
    keyed by the kernel's source, the GPU architecture and the candidate list; where it has
    AsyncCompileMode too (3.5), a shape's first tuning compiles its candidates in parallel and
    times its finalists again (ParallelCompileAutotuner), their `finalist_variants` with them.
    An older Triton's autotuner times every variant of every config.
    """
    prune_by = {"early_config_prune": prune}
    if hasattr(triton, "AsyncCompileMode") and hasattr(Autotuner, "check_disk_cache"):
        tuner = ParallelCompileAutotuner(kernel, kernel.arg_names, configs, key, None, None, prune_configs_by=prune_by,
                                         do_bench=autotune_bench, cache_results=True)
        tuner.finalist_variants = finalist_variants
        return tuner
    if finalist_variants is not None:
        configs = _with_variants(configs, finalist_variants)
    disk_cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=key, prune_configs_by=prune_by, do_bench=autotune_bench, **disk_cache)(kernel)


def every_candidate(tuner: Autotuner) -> list[triton.Config]:
    """Every config `tuner` may choose: its configs and their finalist variants."""
    variants = getattr(tuner, "finalist_variants", None)
    return _with_variants(tuner.configs, variants) if variants else tuner.configs


def with_settings(config: triton.Config, *settings: dict) -> list[triton.Config]:
    """`config` once per setting, the setting's values over its own: a kernel's finalist variants."""
    return [triton.Config({**config.kwargs, **setting}, num_warps=config.num_warps, num_stages=config.num_stages)
            for setting in settings]


def _with_variants(configs: list[triton.Config],
                   variants: Callable[[triton.Config], list[triton.Config]]) -> list[triton.Config]:
    return configs + [variant for config in configs for variant in variants(config)]


def chosen_config(tuner: Autotuner, key_prefix: tuple) -> triton.Config | None:
    """The config `tuner` chose for the shape whose tuning key starts with `key_prefix` (the values
    of its `key` arguments in order; Triton appends the arguments' dtypes), None before that
    shape's first call."""
    return next((config for key, config in tuner.cache.items() if tuple(key[: len(key_prefix)]) == key_prefix), None)


@contextlib.contextmanager
def pinned(tuner: Autotuner, name: str, describe: Callable[[triton.Config], str], hint: str):
    """Within the block `tuner` has one candidate, the one `describe` calls `name`: a benchmark or a
    profiler then runs the config it names, untuned, on every shape whatever was chosen for it
    before. Triton launches a lone candidate without pruning it: a kernel whose tiles must fit the
    shape checks it (`check_lone_candidate_fits`). `hint` says where the names come from."""
    matches = [config for config in every_candidate(tuner) if describe(config) == name]
    if not matches:
        raise ValueError(f"no config is named {name!r}; {hint}")
    saved, tuner.configs = tuner.configs, matches[:1]
    try:
        yield
    finally:
        tuner.configs = saved


def check_lone_candidate_fits(tuner: Autotuner, prune: Callable, describe: Callable[[triton.Config], str],
                              shape: str, **args) -> None:
    """Raise where `tuner` has one candidate (`pinned`) that `prune` would not offer for `args`."""
    if len(tuner.configs) == 1 and not prune(tuner.configs, {}, **args):
        raise ValueError(f"the pinned config {describe(tuner.configs[0])!r} does not fit {shape}; pin one that fits")
