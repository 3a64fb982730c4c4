"""An experiment for M = 1 on Hopper: the Gluon GEMV with its words brought by TMA, a program's whole span at once.

The Gluon GEMV (w4a16_gluon_kernel.gemv_kernel) keeps one or two tiles of words in flight per
thread, in registers. On 8B gate/up_proj its ncu profile had every program resident at once
(0.85 waves), DRAM 51% busy and long-scoreboard stalls first (gpu_profile_h200_gluon.log): each
program walks its span in a chain of round trips to DRAM, a few kilobytes at a time. Here each
program asks the copy engine (TMA) for its span's words into shared memory at its start, up to
STAGES groups at once, so a program's bytes cost one round trip instead of a chain of them and
hold no registers while in flight. Where the span has more groups than STAGES, the buffers form a
ring: once every thread has used a group's words (a block barrier after their values entered the
sum, so no copy overwrites a buffer whose reads are in flight: round 16's lesson), the next
group's copy goes into its buffer. x's staging and each tile's dots are the GEMV's own
(`staged_x_pairs`, `tile_dots`); scales and zero points are loaded a group ahead as there.

For each shape (asymmetric, group 128) this times every config offered once, then the fastest
beside the Gluon GEMV's tuned choice (the dispatcher's M = 1 path) in turns, seven rounds each, and
reports the medians (CUDA-graph replays, cold L2), with bf16 cuBLAS from the same process. On an
H200 it took 1.01-1.12x the Gluon GEMV's time on all eight shapes (gpu_gemv_tma_h200.md), and spans
up to all of K did not change that (gpu_gemv_tma_long_spans_h200.md): bytes in flight are not what
bounds these programs. `--anatomy` times the kernel with parts of its work left out, to see what
does (docs/gpu_notes.md, round 17), and a split-K tail without a tile counter (`_last_adder_tail`).

    python benchmarks/gpu_gemv_tma.py --out benchmarks/results/gpu_gemv_tma_h200
    python benchmarks/gpu_gemv_tma.py --anatomy --out benchmarks/results/gpu_gemv_anatomy_h200
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from lowbit.bench.kernels import SHAPES
from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_gluon_gemv
from lowbit.kernels.int4_pack import SYMMETRIC_ZERO, pack_quantized_weight
from lowbit.kernels.timing import graph_time_ms
from lowbit.kernels.w4a16_gluon_kernel import (_barrier, _f16_pair, compile_gluon_for_sm90, staged_x_pairs,
                                              store_split_k, tile_dots)
from lowbit.kernels.w4a16_triton import split_k_workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import shapes_command  # noqa: E402

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
"""A TMA copy into shared memory: `async_load` from Triton 3.7, `async_copy_global_to_shared` before."""
ROUNDS = 7
GROUP = 128
MAX_SHARED = 200 * 1024
"""The words' buffers of one program, at most (an sm_90 SM has 227 KB)."""
PROGRAMS = (48, 4096)
"""Fewer programs leave SMs idle, more repeat x's staging: as w4a16_gluon_gemv._PROGRAMS, but down to
one program for most SMs, since a TMA ring keeps a long span's words in flight without registers, and
a span of all K needs no split-K tail (1.2-2.1 us a call on the 8B shapes, gpu_gemv_anatomy_tail_h200.md)."""


@gluon.jit
def gemv_tma_kernel(x_ptr, w_desc, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_sg, stride_om,
                    GROUP: ttgl.constexpr, SYMMETRIC: ttgl.constexpr, ZERO: ttgl.constexpr, BLOCK_N: ttgl.constexpr,
                    K_SPAN: ttgl.constexpr, WARPS: ttgl.constexpr, BLOCK_K: ttgl.constexpr, STAGES: ttgl.constexpr,
                    WORDS: ttgl.constexpr = True, DOTS: ttgl.constexpr = True, TAIL: ttgl.constexpr = 0):
    """out[0, tile] = x[0] @ W[tile]ᵀ over one span of K, the plain words [K / 8, N] by TMA:
    STAGES groups' words requested at once (the whole span where it has no more groups), each
    group's as one copy [GROUP / 8, BLOCK_N] beside its mbarrier.

    For `anatomy` only (wrong products, timing only): WORDS=False copies no words (the dots read
    whatever shared memory holds), DOTS=False multiplies nothing (acc sums the scales), and TAIL
    takes the split-K tail apart: 0 whole (store_split_k), 1 none (each split's partial sums stored
    straight into out, racing), 2 the adds into the workspace alone, 3 the tile counter and the
    last program's read-back alone, no adds. TAIL 4 is a whole tail of another kind (right
    products): `_last_adder_tail`."""
    VEC: ttgl.constexpr = BLOCK_N // (32 * WARPS)
    ROWS: ttgl.constexpr = BLOCK_K // 8
    W_L: ttgl.constexpr = ttgl.BlockedLayout([ROWS, VEC], [1, 32], [1, WARPS], [1, 0])
    ROW_L: ttgl.constexpr = ttgl.SliceLayout(1, W_L)
    COL_L: ttgl.constexpr = ttgl.SliceLayout(0, W_L)
    SPAN_GROUPS: ttgl.constexpr = K_SPAN // GROUP
    GROUP_TILES: ttgl.constexpr = GROUP // BLOCK_K
    FIRST: ttgl.constexpr = STAGES if STAGES < SPAN_GROUPS else SPAN_GROUPS
    pid_n = ttgl.program_id(0)
    pid_k = ttgl.program_id(1)
    n0 = pid_n * BLOCK_N
    row0 = pid_k * (K_SPAN // 8)
    words = ttgl.allocate_shared_memory(ttgl.int32, [STAGES, GROUP // 8, BLOCK_N], w_desc.layout)
    ready = ttgl.allocate_shared_memory(ttgl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in ttgl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
    fence_async_shared()  # the barriers' initialization, seen by TMA before its first copy
    _barrier()
    if WORDS:
        for b in ttgl.static_range(FIRST):
            mbarrier.expect(ready.index(b), w_desc.block_type.nbytes)
            _tma_load(w_desc, [row0 + b * (GROUP // 8), n0], ready.index(b), words.index(b))
    cols = n0 + ttgl.arange(0, BLOCK_N, layout=COL_L)
    g0 = pid_k * SPAN_GROUPS
    s_next = ttgl.load(s_ptr + g0 * stride_sg + cols)
    if SYMMETRIC:
        z_next = ttgl.full([BLOCK_N], ZERO, ttgl.float32, COL_L)
    else:
        z_next = ttgl.load(z_ptr + g0 * stride_sg + cols).to(ttgl.float32)
    pairs04, pairs15, pairs26, pairs37, inverse = staged_x_pairs(x_ptr, pid_k * K_SPAN, GROUP, SPAN_GROUPS, WARPS)
    _barrier()
    acc = ttgl.zeros([BLOCK_N], ttgl.float32, COL_L)
    for g in range(0, SPAN_GROUPS):
        s = g % STAGES
        scale = s_next.to(ttgl.float32)
        z = z_next
        g_next = g0 + ttgl.minimum(g + 1, SPAN_GROUPS - 1)
        s_next = ttgl.load(s_ptr + g_next * stride_sg + cols)
        if not SYMMETRIC:
            z_next = ttgl.load(z_ptr + g_next * stride_sg + cols).to(ttgl.float32)
        plus_1024_z = ttgl.expand_dims(_f16_pair(1024.0 + z, 1024.0 + z), 0)
        minus_64_z = ttgl.expand_dims(_f16_pair(-64.0 - z, -64.0 - z), 0)
        if WORDS:
            mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        group_sum = ttgl.zeros([BLOCK_N], ttgl.float32, COL_L)
        if DOTS:
            for i in ttgl.static_range(GROUP_TILES):
                w = words.index(s).slice(i * ROWS, ROWS).load(W_L)
                group_sum += tile_dots(w, pairs04, pairs15, pairs26, pairs37, inverse, g, i * ROWS, plus_1024_z,
                                       minus_64_z, ROWS, ROW_L)
        else:
            group_sum += 1.0
        acc += scale * group_sum
        if WORDS and STAGES < SPAN_GROUPS:
            if g + STAGES < SPAN_GROUPS:
                _barrier()  # every thread's reads of buffer s are done: its values are in acc
                mbarrier.expect(ready.index(s), w_desc.block_type.nbytes)
                _tma_load(w_desc, [row0 + (g + STAGES) * (GROUP // 8), n0], ready.index(s), words.index(s))
    OUT_L: ttgl.constexpr = ttgl.BlockedLayout([1, VEC], [1, 32], [1, WARPS], [1, 0])
    out = ttgl.convert_layout(ttgl.expand_dims(acc, 0), OUT_L)
    out_rows = ttgl.expand_dims(ttgl.arange(0, 1, layout=ttgl.SliceLayout(1, OUT_L)), 1)
    out_cols = ttgl.expand_dims(n0 + ttgl.arange(0, BLOCK_N, layout=ttgl.SliceLayout(0, OUT_L)), 0)
    if TAIL == 0:
        store_split_k(out, out_ptr, ws_ptr, cnt_ptr, pid_n, out_rows, out_cols, out_rows < M, N, stride_om)
    elif TAIL == 1:
        ttgl.store(out_ptr + out_rows * stride_om + out_cols, out.to(ttgl.bfloat16), mask=out_rows < M)
    elif TAIL == 2:
        ttgl.atomic_add(ws_ptr + out_rows * N + out_cols, out, mask=out_rows < M, sem="relaxed")
    elif TAIL == 4:
        _last_adder_tail(out, out_ptr, ws_ptr, out_rows * N + out_cols, out_rows * stride_om + out_cols, out_rows < M)
    else:
        _barrier()
        count = ttgl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if count == ttgl.num_programs(1) - 1:
            total = ttgl.load(ws_ptr + out_rows * N + out_cols, mask=out_rows < M, other=0.0, cache_modifier=".cg")
            ttgl.store(out_ptr + out_rows * stride_om + out_cols, (total + out).to(ttgl.bfloat16), mask=out_rows < M)
            ttgl.store(cnt_ptr + pid_n, 0)


FIXED_POINT_BITS = ttgl.constexpr(24)
"""Fraction bits of `_last_adder_tail`'s sums: 2^-24 absolute resolution, |y| below 2^31."""


@gluon.jit
def _last_adder_tail(acc, out_ptr, ws_ptr, ws_offs, out_offs, mask):
    """Split-K without a tile counter: each element's partial sum enters the int64 workspace as
    fixed point shifted past an 8-bit count, 256·round(acc·2^24) + 1, by one returning atomic add;
    the program whose add brings the element's count to the number of splits holds the whole sum
    (old + its own word), writes it and zeroes the element. No fence, no counter round trip and no
    read-back: one atomic round trip, then the store. Integer adds are exact and commutative, so
    the result does not depend on the order the splits arrive in."""
    scaled = acc * (1 << FIXED_POINT_BITS)
    fixed = ttgl.inline_asm_elementwise("cvt.rni.s64.f32 $0, $1;", "=l,r", [scaled], dtype=ttgl.int64, is_pure=True,
                                        pack=1)
    word = fixed * 256 + 1
    old = ttgl.atomic_add(ws_ptr + ws_offs, word, mask=mask, sem="relaxed")
    total = old + word
    last = mask & ((total & 255) == ttgl.num_programs(1))
    value = (total >> 8).to(ttgl.float32) * (1.0 / (1 << FIXED_POINT_BITS))
    ttgl.store(out_ptr + out_offs, value.to(ttgl.bfloat16), mask=last)
    ttgl.store(ws_ptr + ws_offs, ttgl.zeros_like(word), mask=last)


class Config(NamedTuple):
    block_n: int
    warps: int
    block_k: int
    span: int
    stages: int


def shared_bytes(config: Config) -> int:
    """The words' buffers of one program."""
    return config.stages * GROUP // 8 * config.block_n * 4


def configs(n: int, k: int) -> list[Config]:
    """Tiles of 64 to 256 columns (a TMA box is at most 256 wide), one or two columns a thread
    (VEC), spans of whole groups up to 4096 (all of K on the 8B shapes but down_proj: no split),
    as many buffers as the span has groups or fewer (a ring), within MAX_SHARED and PROGRAMS."""
    offered = [Config(*values) for values in itertools.product((64, 128, 256), (2, 4, 8), (32,),
                                                              (128, 256, 512, 1024, 2048, 4096), (1, 2, 4, 8, 16))]
    fitting = [c for c in offered if c.block_n // (32 * c.warps) in (1, 2) and n % c.block_n == 0
               and k % c.span == 0 and c.stages <= c.span // GROUP and shared_bytes(c) <= MAX_SHARED]
    programs = {c: (n // c.block_n) * (k // c.span) for c in fitting}
    low, high = min(PROGRAMS[0], max(programs.values())), max(PROGRAMS[1], min(programs.values()))
    return [c for c in fitting if low <= programs[c] <= high]


def _words_layout():
    return ttgl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def _constexprs(config: Config, group: int, symmetric: bool) -> dict:
    return {"GROUP": group, "SYMMETRIC": symmetric, "ZERO": SYMMETRIC_ZERO, "BLOCK_N": config.block_n,
            "K_SPAN": config.span, "WARPS": config.warps, "BLOCK_K": config.block_k, "STAGES": config.stages}


def compile_for_sm90(config: Config, symmetric: bool = False, tail: int = 0):
    """`gemv_tma_kernel` compiled for sm_90 without a GPU, with split-K tail `tail`: for the tests."""
    types = {"w_desc": f"tensordesc<i32[{GROUP // 8},{config.block_n}],{_words_layout()!r}>",
             "ws_ptr": "*i64" if tail == 4 else "*fp32"}
    flags = {"WORDS": True, "DOTS": True, "TAIL": tail}  # constexprs: left out, they would compile as i32 arguments
    return compile_gluon_for_sm90(gemv_tma_kernel, {**_constexprs(config, GROUP, symmetric), **flags}, config.warps,
                                  types=types)


def launch(x: torch.Tensor, packed, config: Config, **parts) -> torch.Tensor:
    """x [1, K] bf16 @ Wᵀ with `gemv_tma_kernel` at `config` (`parts`: its anatomy flags)."""
    n, k = packed.out_features, packed.in_features
    out = torch.empty(1, n, device=x.device, dtype=torch.bfloat16)
    ws, counters = split_k_workspace(x.device, n)
    if parts.get("TAIL") == 4:
        ws = _fixed_point_workspace(x.device, n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    w_desc = TensorDescriptor.from_tensor(packed.qweight, [packed.group_size // 8, config.block_n], _words_layout())
    gemv_tma_kernel[(n // config.block_n, k // config.span)](
        x, w_desc, packed.scales, zeros, out, ws, counters, 1, n, k, x.stride(0), packed.scales.stride(0),
        out.stride(0), **_constexprs(config, packed.group_size, packed.symmetric), **parts, num_warps=config.warps)
    return out


_FIXED_WS: dict = {}


def _fixed_point_workspace(device: torch.device, n: int) -> torch.Tensor:
    """`_last_adder_tail`'s int64 elements, zero between calls (each call's last adders zero them)."""
    key = (device, n)
    if key not in _FIXED_WS:
        _FIXED_WS[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return _FIXED_WS[key]


def describe(config: Config) -> str:
    return f"1x{config.block_n}x{config.block_k} span {config.span} w{config.warps} stages {config.stages}"


def run_shape(name: str) -> list[dict]:
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=GROUP), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    dense = qweight.dequantize().to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qweight.dequantize().double().T
    timed = []
    for config in configs(n, k):
        error = float((launch(x, packed, config).double() - ref).norm() / ref.norm())
        if not error < 1e-2:
            raise SystemExit(f"{name} {describe(config)}: relative error {error:.2e}")
        timed.append((1000 * graph_time_ms(lambda c=config: launch(x, packed, c)), describe(config), config, error))
    _, _, best, error = min(timed)
    w4a16_gluon_gemv.matmul(x, packed)  # the Gluon GEMV tuned for this shape
    rounds = {"tma": [], "gemv": [], "bf16": []}
    for _ in range(ROUNDS):  # in turns: a drift in the clocks touches all alike
        rounds["tma"].append(1000 * graph_time_ms(lambda: launch(x, packed, best)))
        rounds["gemv"].append(1000 * graph_time_ms(lambda: w4a16_gluon_gemv.matmul(x, packed)))
        rounds["bf16"].append(1000 * graph_time_ms(lambda: x @ dense.T))
    row = {"shape": name, "tma config": describe(best), "tma us": statistics.median(rounds["tma"]),
           "tma error": error, "gemv config": w4a16_gluon_gemv.tuned_config(packed),
           "gemv us": statistics.median(rounds["gemv"]), "bf16 us": statistics.median(rounds["bf16"]),
           "configs": len(timed)}
    print(row, flush=True)
    return [row]


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"The Gluon GEMV with its words by TMA (benchmarks/gpu_gemv_tma.py) beside the Gluon GEMV's tuned choice, "
             f"M = 1, asym g128, on {device} (torch {torch.__version__}, triton {triton.__version__}); microseconds "
             f"per call, medians of {ROUNDS} rounds in turns, CUDA-graph replays, cold L2; error against float64.", "",
             "| shape | TMA config (of n timed) | TMA us | error | GEMV config | GEMV us | bf16 us | TMA / GEMV | "
             "bf16 / TMA |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tma config']} ({r['configs']}) | {r['tma us']:.1f} | {r['tma error']:.1e} | "
                     f"{r['gemv config']} | {r['gemv us']:.1f} | {r['bf16 us']:.1f} | {r['tma us'] / r['gemv us']:.2f} | "
                     f"{r['bf16 us'] / r['tma us']:.2f}x |")
    return "\n".join(lines) + "\n"


PARTS = {"whole": {}, "no split-K tail": {"TAIL": 1}, "tail: adds alone": {"TAIL": 2},
         "tail: counter alone": {"TAIL": 3}, "last-adder tail": {"TAIL": 4}, "no dots": {"DOTS": False},
         "words only": {"DOTS": False, "TAIL": 1}, "dots only": {"WORDS": False, "TAIL": 1},
         "neither": {"WORDS": False, "DOTS": False, "TAIL": 1}}
"""Parts of a call `anatomy` times: the whole kernel; without its split-K tail (partial sums stored
racing); the tail's adds into the workspace alone, or its counter and read-back alone; the
last-adder tail instead of the counter (right products: its error is reported); without
its dots; words copied and waited on alone (no dots, no tail); dots alone (no words copied, no
tail); and neither (x staged, scales summed, stored)."""


def anatomy_shape(name: str) -> list[dict]:
    """Where a call's time goes: the fastest whole-span config (no ring) of the shape, with parts
    of its work left out (PARTS), beside the tuned Gluon GEMV, seven rounds in turns, medians."""
    n, k = SHAPES[name]
    torch.manual_seed(0)
    qweight = quantize_matrix(IntegerFormat(4, symmetric=False, group_size=GROUP), torch.randn(n, k, device="cuda"))
    packed = pack_quantized_weight(qweight)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    whole_span = [c for c in configs(n, k) if c.stages == c.span // GROUP]
    best = min(whole_span, key=lambda c: graph_time_ms(lambda: launch(x, packed, c)))
    w4a16_gluon_gemv.matmul(x, packed)
    ref = x.double() @ qweight.dequantize().double().T
    for _ in range(3):  # again and again: each call's last adders must leave the workspace zero
        last_adder_error = float((launch(x, packed, best, TAIL=4).double() - ref).norm() / ref.norm())
    rounds = {part: [] for part in [*PARTS, "Gluon GEMV"]}
    for _ in range(ROUNDS):
        for part, flags in PARTS.items():
            rounds[part].append(1000 * graph_time_ms(lambda f=flags: launch(x, packed, best, **f)))
        rounds["Gluon GEMV"].append(1000 * graph_time_ms(lambda: w4a16_gluon_gemv.matmul(x, packed)))
    row = {"shape": name, "config": describe(best), "last-adder error": last_adder_error,
           **{part: statistics.median(t) for part, t in rounds.items()}}
    print(row, flush=True)
    return [row]


def anatomy_markdown(rows: list[dict], device: str) -> str:
    parts = [*PARTS, "Gluon GEMV"]
    lines = [f"Where an M = 1 call's time goes: the TMA GEMV (benchmarks/gpu_gemv_tma.py --anatomy) with parts of its "
             f"work left out (products wrong, timing only), on {device} (torch {torch.__version__}, triton "
             f"{triton.__version__}); microseconds per call, medians of {ROUNDS} rounds in turns, CUDA-graph replays, "
             "cold L2; the last-adder tail's error against float64.", "",
             "| shape | config | " + " | ".join(parts) + " | last-adder error |", "|---|---|" + "---:|" * (len(parts) + 1)]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['config']} | " + " | ".join(f"{r[p]:.1f}" for p in parts)
                     + f" | {r['last-adder error']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--anatomy" in sys.argv:
        sys.argv.remove("--anatomy")
        shapes_command(__doc__.splitlines()[0], SHAPES, anatomy_shape,
                       lambda rows: anatomy_markdown(rows, torch.cuda.get_device_name()))
    else:
        shapes_command(__doc__.splitlines()[0], SHAPES, run_shape,
                       lambda rows: markdown(rows, torch.cuda.get_device_name()))
