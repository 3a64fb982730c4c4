"""W4A16 for 2 <= M <= 64 on Hopper: a Gluon kernel whose loaded words are the tensor cores' operand.

At M <= 16 the product's work is streaming K·N/2 bytes of codes. lowbit's Triton tile for it
(w4a16_triton's paired dots) spends about 4.9 SASS instructions per code, much of it moving the
unpacked weights into the register layout of the MMA operand, a layout Triton picks. Gluon,
Triton's dialect with explicit layouts, lets the layout be chosen here instead. Each weight's
words are shuffled once, on its first product (`shuffle_words`), so that every thread loads, with
one 16-byte load per 32 columns, exactly the codes of its mma.m16n8k16 B-operand registers for one
group. One lop3 and one sub.bf16x2 turn a word's nibbles j and j + 4 into the (k, k + 1) pair of
one register, exactly (q + 128 - (z + 128) in bf16), and the compiler asserts that the conversion
to the operand layout is a no-op. The loop then costs 2.3-3.0 SASS instructions per code
(gluon_sass_sm90.md).

x's span of K is staged in shared memory once per program, where every warp reads its A fragments.
The words of the next two groups are loaded into registers ahead of the group being multiplied,
or of the next one only, which frees registers for more warps an SM: the tuner tries that on its
finalists (AHEAD), and chose it on six of the eight shapes at 16 rows (gpu_kernels_h200.md).
The first groups are requested before x is staged, so the x loads and the barrier overlap the
first words' DRAM latency. An ncu profile of this kernel showed it latency-bound: one instruction
issued every two cycles, DRAM 44% busy (gpu_profile_h200_m16_gluon.log). 16-byte loads, the
c-innermost word order, and the early requests each came from that profile. Asymmetric zero points
are either unpacked with the codes or folded into a per-group correction (w4a16_gluon_kernel.m16_kernel's
FOLD_ZEROS), which frees registers: 0.92-0.99x the time of unpacking them on 7 of 8 shapes, 1.09x on
the eighth (gpu_gluon_zero_fold_h200.md). Neither wins everywhere, so the tuner chooses per shape,
trying the unpacked zero points on its finalists only.
Where they are folded, the codes enter the MMA with their bias, 128 + q, straight from one lop3 a
register, and the correction takes the bias off with the zero point: a fifth fewer instructions
per code (2.14 against 2.66 at 16x128 w4, gluon_sass_sm90.md), 0.95-1.04x the time of folding
without the bias, faster on 6 of 8 shapes (gpu_gluon_biased_h200.md).
The tile has 16 rows up to M = 16 and 32 above (`tile_shape`): at 32 each unpacked B fragment
feeds two MMAs, and x's span is staged as 32 rows. On an H200 the 32-row tile took 0.58-0.91x
the time of the dispatcher's best other path at M = 24 and 32 on all eight Llama shapes (70B
gate/up at 32 rows: 76.2 us against FBGEMM's 110.9, gpu_gluon_m32_h200.md); a 64-row tile was
slower than FBGEMM's or the fused Triton tile on most shapes at 48 and 64 rows (0.73-1.09x their
speed, gpu_gluon_m64_h200.md), so from 33 to 64 rows the kernel runs two 32-row tiles, the two
programs of a column tile adjacent in the grid so that the second may find the words in L2. That
took 0.89-0.95x the time of the best other path on the narrow shapes and lost on the wide ones,
where every tile still unpacks all its words (70B gate/up: 76.2 us at 32 rows, 134.0 at 64;
gpu_gluon_2x32_h200.md): the dispatcher picks per shape.
Split-K programs meet through w4a16_triton's self-resetting workspace, so a call is one launch.

Like FBGEMM's layout (w4a16_fbgemm.py), the shuffled words are built on a weight's first product,
kept beside it keyed by its qweight tensor, and rebuilt if that is written in place. The dispatcher
(w4a16.py) times this path against the others per shape and drops the copy when another path wins.
bf16 activations only: the exact unpack subtracts in bf16.
"""

from __future__ import annotations

import functools
import importlib

import torch

from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, PackedInt4, unpack_int4
from lowbit.kernels.weight_copies import WeightCopies

MAX_M = 64
"""Two 32-row tiles at most: larger M goes to the other paths."""
_WARPS = (4, 8)
"""Warps split a tile's columns: at 8, a tile of 128 columns holds 88 registers a thread against
150 at 4, so an SM keeps 16 of its warps in flight instead of 12 (gluon_sass_sm90.md)."""
GROUPS = (32, 64, 128, 256)
"""Group sizes the word layout takes: one to eight k32 chunks per group, a power of two."""
MAX_WORDS_PER_THREAD = 32
"""Registers of words one thread holds per group (three groups are live at once); wider tiles spill."""
_BLOCK_N = (64, 128, 256)
_K_SPANS = (128, 256, 512, 1024, 2048)
"""x's span in shared memory: 32 rows x 2048 x 2 bytes = 128 KB at most, within an H100's 227 KB."""
_MAX_PROGRAMS = 4096


def tile_shape(m: int) -> dict[str, int]:
    """The kernel's rows for M rows of x: a tile of BLOCK_M rows (16 up to 16, else 32), ROW_BLOCKS
    of them. The tuner keys on both, so each shape has a choice at 16, 32 and 2 x 32 rows."""
    rows = 16 if m <= 16 else 32
    return {"BLOCK_M": rows, "ROW_BLOCKS": -(-m // rows)}


_LAYOUTS = WeightCopies()
"""Each weight's shuffled words."""


@functools.cache
def import_error() -> str | None:
    """None when this path can run here; otherwise why not, in one line (for reports)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (9, 0):
        return "needs an sm_90 or newer GPU (sub.bf16x2)"
    try:
        importlib.import_module("triton.experimental.gluon.language.nvidia.ampere")
    except ImportError as error:
        return f"this Triton has no Gluon ({error})"
    return None


def available() -> bool:
    return import_error() is None


def supports(packed: PackedInt4, dtype: torch.dtype) -> bool:
    """bf16 activations; a group size in GROUPS dividing K; N a multiple of the narrowest tile."""
    return (dtype == torch.bfloat16 and packed.qweight.is_cuda and packed.group_size in GROUPS
            and packed.in_features % packed.group_size == 0 and packed.out_features % _BLOCK_N[0] == 0
            and available())


def shuffle_words(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 words [K / G, N / 8, 8, 4, G / 32], flattened.

    Word (g, nb, ni, t, c) holds column 8·nb + ni. Its nibble 4h + 2·j1 + j0 is the code at
    K = G·g + 32c + 16·j1 + 8·j0 + 2t + h. So thread t of a column's quad finds the (k, k + 1) pair
    of its B-operand register j1·2 + j0 in nibbles j and j + 4. Its group's chunks c lie side by
    side, for one 16-byte load.
    """
    n, k = codes.shape
    chunks = group_size // 32
    v = codes.reshape(n // 8, 8, k // group_size, chunks, 2, 2, 4, 2)  # nb, ni, g, c, j1, j0, t, h
    v = v.permute(2, 0, 1, 6, 3, 7, 4, 5).contiguous()  # g, nb, ni, t, c, h, j1, j0: nibble order
    words = torch.zeros(v.shape[:-3], dtype=torch.int32, device=codes.device)
    for nibble, bits in enumerate(v.reshape(*v.shape[:-3], 8).unbind(-1)):
        words |= bits.to(torch.int32) << (4 * nibble)  # nibble 7 wraps into the sign bit, as intended
    return words.reshape(-1)


def layout(packed: PackedInt4) -> torch.Tensor:
    """`packed`'s shuffled words, built on first use and rebuilt after an in-place write."""
    return _LAYOUTS.get(packed, lambda: shuffle_words(unpack_int4(packed.qweight, packed.in_features),
                                                      packed.group_size))


def release(packed: PackedInt4) -> None:
    """Drop `packed`'s shuffled copy (the dispatcher chose another path for its shape)."""
    _LAYOUTS.release(packed)


@functools.cache
def _tuned():
    """The autotuned kernel, built on first use: importing Gluon needs a Triton that has it."""
    import triton

    from lowbit.kernels.autotune import autotune
    from lowbit.kernels.w4a16_gluon_kernel import m16_kernel

    configs = [triton.Config({"BLOCK_N": bn, "K_SPAN": span, "WARPS": warps, "FOLD_ZEROS": True, "AHEAD": 2},
                             num_warps=warps)
               for bn in _BLOCK_N for span in _K_SPANS for warps in _WARPS]
    return autotune(configs, ["N", "K", "GROUP", "SYMMETRIC", "BLOCK_M", "ROW_BLOCKS"], _prune, m16_kernel,
                    finalist_variants=_variants)


def _variants(config) -> list:
    """The tile with its zero points unpacked instead of folded, and with one group's words in
    flight instead of two, tried on the tuner's finalists only (autotune's finalist variants).
    Unpacked won one shape of eight side by side (8B q/o_proj, gpu_gluon_zero_fold_h200.md), and
    offered on every tile it doubled the candidates to compile and time. One group ahead frees a
    group's words, so more warps fit on an SM: the tuner chose it on six of the eight shapes at 16
    rows (gpu_kernels_h200.md)."""
    from lowbit.kernels.autotune import with_settings

    return with_settings(config, {"FOLD_ZEROS": False}, {"AHEAD": 1})


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Configs that fit the shape: whole tiles of N, spans of whole groups dividing K, at most
    MAX_WORDS_PER_THREAD words per thread, and at most _MAX_PROGRAMS programs. Symmetric weights
    have no zero points to unpack or fold: one of the two FOLD_ZEROS settings (the kernel ignores it)."""
    args = {**named_args, **kwargs}
    n, k, group = args["N"], args["K"], args["GROUP"]
    kept = []
    for config in configs:
        bn, span, warps = config.kwargs["BLOCK_N"], config.kwargs["K_SPAN"], config.kwargs["WARPS"]
        if args["SYMMETRIC"] and not config.kwargs["FOLD_ZEROS"]:
            continue
        words_per_thread = (group // 32) * (bn // (8 * warps))
        if (n % bn == 0 and span % group == 0 and k % span == 0 and 1 <= words_per_thread <= MAX_WORDS_PER_THREAD
                and (n // bn) * args.get("ROW_BLOCKS", 1) * (k // span) <= _MAX_PROGRAMS):
            kept.append(config)
    return kept


def _describe(config, rows: str = "16") -> str:
    """A config as the benchmark tables name it: "16x128 span 1024 w8" (rows x columns, K's span
    per program, warps; "2x32x128 ..." for two blocks of 32 rows), "... unpacked zeros" where the
    zero points enter the unpack, "... ahead 1" with one group's words in flight."""
    kw = config.kwargs
    return (f"{rows}x{kw['BLOCK_N']} span {kw['K_SPAN']} w{kw['WARPS']}" + ("" if kw["FOLD_ZEROS"] else " unpacked zeros")
            + ("" if kw["AHEAD"] == 2 else f" ahead {kw['AHEAD']}"))


def tuned_config(packed: PackedInt4, m: int = 16) -> str | None:
    """The config chosen for this weight's shape at M rows, e.g. "16x128 span 1024 w4" (None before
    the first call)."""
    from lowbit.kernels.autotune import chosen_config

    tile = tile_shape(m)
    config = chosen_config(_tuned(), (packed.out_features, packed.in_features, packed.group_size, packed.symmetric,
                                      *tile.values()))
    return None if config is None else _describe(config, _rows_name(tile))


def _rows_name(tile: dict[str, int]) -> str:
    """"16", "32" or "2x32": the rows of a tile_shape as config names lead with them."""
    blocks = tile["ROW_BLOCKS"]
    return f"{blocks}x{tile['BLOCK_M']}" if blocks > 1 else str(tile["BLOCK_M"])


def pinned_config(name: str):
    """Within the block the kernel has one candidate, the one `tuned_config` would call `name`: a
    profiler then sees the config a benchmark chose, untuned."""
    from lowbit.kernels.autotune import pinned

    rows = name.split(" ", 1)[0].rpartition("x")[0]  # "16", "32" or "2x32"
    return pinned(_tuned(), name, functools.partial(_describe, rows=rows or "16"),
                  "write a Gluon W4A16 config as tuned_config() does, e.g. '16x128 span 1024 w4'")


def matmul(x: torch.Tensor, packed: PackedInt4) -> torch.Tensor:
    """x [M <= 64, K] (bf16, CUDA, columns already in the packed order) @ Wᵀ -> [M, N] bf16."""
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"the Gluon W4A16 kernel takes at most {MAX_M} rows, got {m}")
    from lowbit.kernels.autotune import check_lone_candidate_fits  # after the checks: needs Triton
    from lowbit.kernels.w4a16_triton import split_k_workspace

    x = x.contiguous()
    n = packed.out_features
    words = layout(packed)
    zeros = packed.zeros if packed.zeros is not None else packed.scales  # unused when symmetric
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, m * n)
    tile = tile_shape(m)
    grid = lambda meta: (n // meta["BLOCK_N"] * tile["ROW_BLOCKS"], k // meta["K_SPAN"])  # noqa: E731
    kernel = _tuned()
    check_lone_candidate_fits(kernel, _prune, functools.partial(_describe, rows=_rows_name(tile)),
                              f"a {n}x{k} weight of group {packed.group_size}", N=n, K=k, GROUP=packed.group_size,
                              SYMMETRIC=packed.symmetric, ROW_BLOCKS=tile["ROW_BLOCKS"])
    kernel[grid](x, words, packed.scales, zeros, out, ws, counters, m, n, k, x.stride(0), packed.scales.stride(0),
                 out.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric, ZERO=SYMMETRIC_ZERO, **tile)
    return out


def add_into(x: torch.Tensor, packed: PackedInt4, sums: torch.Tensor) -> bool:
    """x [M <= 64, K] @ Wᵀ added into `sums` [M, N] (float32, zero before) and left unfinished
    (`launch_unfinished`); False, launching nothing, before the shape is tuned."""
    m = x.shape[0]
    return m <= MAX_M and launch_unfinished(_tuned(), layout(packed), x, packed, sums, **tile_shape(m))


def launch_unfinished(tuner, words: torch.Tensor, x: torch.Tensor, packed: PackedInt4, sums: torch.Tensor,
                      **tile) -> bool:
    """`tuner`'s Gluon kernel (m16_kernel's arguments, `words` in its layout) at the config it chose
    for this shape, x @ Wᵀ added into `sums` without the split-K finish (FINISH=False): the kernel
    that reads the product next rounds it and zeroes `sums` (w4a16.pending_matmul). False,
    launching nothing, before the shape is tuned, since a tuning run would add every candidate's
    product into `sums`. `tile`: compile-time arguments the tuner keys on beyond the shape (tile_shape)."""
    from lowbit.kernels.autotune import chosen_config
    from lowbit.kernels.w4a16_triton import split_k_workspace

    m, k = x.shape
    n = packed.out_features
    config = chosen_config(tuner, (n, k, packed.group_size, packed.symmetric, *tile.values()))
    if config is None:
        return False
    _, counters = split_k_workspace(x.device, m * n)  # not touched: the kernel only adds
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    tuner.fn[(n // config.kwargs["BLOCK_N"] * tile.get("ROW_BLOCKS", 1), k // config.kwargs["K_SPAN"])](
        x, words, packed.scales, zeros, sums, sums, counters, m, n, k, x.stride(0), packed.scales.stride(0),
        sums.stride(0), GROUP=packed.group_size, SYMMETRIC=packed.symmetric, ZERO=SYMMETRIC_ZERO, FINISH=False,
        **tile, **config.kwargs, num_warps=config.num_warps)
    return True
