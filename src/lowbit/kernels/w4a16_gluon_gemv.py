"""W4A16 at M = 1 on Hopper: a Gluon GEMV whose threads load only the words they multiply.

w4a16_triton's GEMV stages each tile of words in shared memory through Triton's pipeliner, and its
loop syncs the block twice a tile: an ncu profile on 8B gate/up_proj put barrier stalls at 1.44
warps per issued instruction (gpu_profile_h200_gemv_8b.log). This kernel
(w4a16_gluon_kernel.gemv_kernel) gives each thread a few columns of every word row of a tile, loaded
one or two tiles ahead into its own registers, so the loop has no barrier; x's span is staged once
per program as fp16 pairs, as the Triton GEMV stages it. It reads the plain words [K / 8, N] that
every other path reads: no copy of the weight. Side by side on the H200 it took 0.77-0.96x the
Triton GEMV's time on all eight Llama shapes (gpu_gluon_gemv_h200.md).

The dispatcher (w4a16.py) times it against the other paths per shape, as "gluon-gemv".
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels import w4a16_gluon
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, PackedInt4

_BLOCK_N = (256, 512, 1024)
_WARPS = (4, 8)
_COLUMNS_PER_THREAD = (1, 2, 4)
"""A thread's columns of a word row: at most four words, one 16-byte load."""
_BLOCK_K = (32, 64)
"""K of a tile: four word rows, or eight as a finalist variant; each row is a load of its own."""
_K_SPANS = (128, 256, 512, 1024, 2048)
_PROGRAMS = (96, 4096)
"""Programs a launch should have: fewer leave SMs idle (132 on an H100 or H200), more repeat x's
staging and the split-K tail to no gain. Where no config reaches a bound, the nearest there are."""


def supports(packed: PackedInt4, dtype: torch.dtype) -> bool:
    """bf16 activations (the output is stored as bf16); a group size the Gluon paths take, dividing
    K into spans of 128; N a multiple of the narrowest tile; Gluon on an sm_90 GPU."""
    return (dtype == torch.bfloat16 and packed.qweight.is_cuda and packed.group_size in w4a16_gluon.GROUPS
            and packed.in_features % max(packed.group_size, _K_SPANS[0]) == 0
            and packed.out_features % _BLOCK_N[0] == 0 and w4a16_gluon.available())


@functools.cache
def _tuned():
    """The autotuned kernel, built on first use: importing Gluon needs a Triton that has it."""
    import triton

    from lowbit.kernels.autotune import autotune
    from lowbit.kernels.w4a16_gluon_kernel import gemv_kernel

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": _BLOCK_K[0], "K_SPAN": span, "WARPS": warps, "AHEAD": 2},
                             num_warps=warps)
               for bn in _BLOCK_N for warps in _WARPS if bn // (32 * warps) in _COLUMNS_PER_THREAD
               for span in _K_SPANS]
    return autotune(configs, ["N", "K", "GROUP", "SYMMETRIC"], _prune, gemv_kernel, finalist_variants=_variants)


def _variants(config) -> list:
    """The config with tiles of eight word rows instead of four, and with one tile's words in
    flight instead of two, tried on the tuner's finalists only (autotune's finalist variants).
    Side by side, eight rows won four shapes of eight and one tile ahead two, by a few percent
    (gpu_gluon_gemv_h200.md), and offered on every config they tripled the candidates: compiling them was 9.3 s of
    `lowbit generate`'s first warm-up at batch 1 (gpu_warmup_breakdown_b1_h200.md of 2fc58fb)."""
    from lowbit.kernels.autotune import with_settings

    return with_settings(config, {"BLOCK_K": _BLOCK_K[1]}, {"AHEAD": 1})


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Configs that fit the shape: whole tiles of N, tiles of K within a group, spans of whole
    groups dividing K, and a number of programs within _PROGRAMS (see there)."""
    args = {**named_args, **kwargs}
    n, k, group = args["N"], args["K"], args["GROUP"]
    fitting = [c for c in configs if n % c.kwargs["BLOCK_N"] == 0 and group % c.kwargs["BLOCK_K"] == 0
               and c.kwargs["K_SPAN"] % group == 0 and k % c.kwargs["K_SPAN"] == 0]
    programs = {c: (n // c.kwargs["BLOCK_N"]) * (k // c.kwargs["K_SPAN"]) for c in fitting}
    if not programs:
        return []
    low = min(_PROGRAMS[0], max(programs.values()))  # a small weight: the most programs there are
    high = max(_PROGRAMS[1], min(programs.values()))  # a huge one: the fewest
    return [c for c in fitting if low <= programs[c] <= high]


def _describe(config) -> str:
    """A config as the benchmark tables name it: "1x512x32 span 128 w4" (rows x columns x K of a
    tile, K's span per program, warps), "... ahead 1" with one tile's words in flight."""
    kw = config.kwargs
    return (f"1x{kw['BLOCK_N']}x{kw['BLOCK_K']} span {kw['K_SPAN']} w{kw['WARPS']}"
            + ("" if kw["AHEAD"] == 2 else f" ahead {kw['AHEAD']}"))


def tuned_config(packed: PackedInt4) -> str | None:
    """The chosen config for this weight's shape, e.g. "1x512x32 span 128 w4" (None before the first call)."""
    from lowbit.kernels.autotune import chosen_config

    config = chosen_config(_tuned(), (packed.out_features, packed.in_features, packed.group_size, packed.symmetric))
    return None if config is None else _describe(config)


def pinned_config(name: str):
    """Within the block the kernel has one candidate, the one `tuned_config` would call `name`."""
    from lowbit.kernels.autotune import pinned

    return pinned(_tuned(), name, _describe,
                  "write a Gluon GEMV config as tuned_config() does, e.g. '1x512x32 span 128 w4'")


def matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [1, K] (bf16, CUDA, columns already in the packed order) @ Wᵀ -> [1, N] bf16."""
    m, k = x.shape
    if m != 1:
        raise ValueError(f"the Gluon W4A16 GEMV takes one row, got {m}")
    from lowbit.kernels.autotune import check_lone_candidate_fits  # after the checks: needs Triton
    from lowbit.kernels.w4a16_triton import split_k_workspace

    x = x.contiguous()
    n = packed.out_features
    zeros = packed.zeros if packed.zeros is not None else packed.scales  # unused when symmetric
    out = torch.empty(1, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, n)
    kernel = _tuned()
    check_lone_candidate_fits(kernel, _prune, _describe, f"a {n}x{k} weight of group {packed.group_size}", N=n, K=k,
                              GROUP=packed.group_size, SYMMETRIC=packed.symmetric)
    grid = lambda meta: (n // meta["BLOCK_N"], k // meta["K_SPAN"])  # noqa: E731
    kernel[grid](x, packed.qweight, packed.scales, zeros, out, ws, counters, 1, n, k, x.stride(0),
                 packed.scales.stride(0), out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
                 ZERO=SYMMETRIC_ZERO)
    return out


def add_into(x: torch.Tensor, packed: PackedInt4, sums: torch.Tensor) -> bool:
    """x [1, K] @ Wᵀ added into `sums` [1, N] (float32, zero before) and left unfinished, from the
    plain words (w4a16_gluon.launch_unfinished); False, launching nothing, before the shape is tuned."""
    return x.shape[0] == 1 and w4a16_gluon.launch_unfinished(_tuned(), packed.qweight, x, packed, sums)
