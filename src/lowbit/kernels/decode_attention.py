"""One decode position's attention over a static KV cache, reading only the positions written so far.

StaticDecoder keeps each layer's keys and values in a [batch, kv_heads, max_len, head_dim] cache
so that a step has fixed shapes and replays as a CUDA graph. torch's scaled_dot_product_attention
over that cache, the unwritten positions masked, reads all max_len of them at every step: on an
H200, an 8B-shaped layer at batch 16 took 66 us a call over a 4096-position cache whether its first
quarter or all of it was written; reading the written positions only, this took 20.8 and 68.6 us
(benchmarks/results/gpu_decode_attention_h200_variants.md, column 128:64). 32 layers of 66 us are
2.1 ms a step, three quarters of a whole int4 step over a short cache (2.75 ms at batch 16,
gpu_decode_h200_pending.md).

`attend` is split-sequence ("flash-decoding") attention in one Triton launch. The cache's written
prefix, read from the device like the step's position, is cut into `splits` equal chunks, so a
graph captured at one position serves all of them with the work spread evenly. Program (b, kv head,
chunk) multiplies all query heads that share the kv head (grouped-query attention reads each key
once) on the tensor cores, with a running softmax over the chunk; the last program of a (b, kv
head) to finish, counted as w4a16's split-K programs count, merges the chunks' partial results.
Where the whole prefix is one chunk, that program writes its result directly.

A coded cache (kv/row_codes.py's CodedCache: int8 or e4m3 codes, a scale per position and head)
is read as its codes, converted to float16 (exact for both) for float16 MMAs, each position's
scale applied to its score and, relative to the tile's largest, to its values; the step's own
position is read as the exact entries written there. This reads half the bytes of a bf16 cache
but does not run faster: converting and scaling the codes costs more than the bytes save, so at
batch 16 over a full 4096-position cache it took 77.5 us with fp8 codes and 78.8 with int8 ones
against 68.2 for bf16, and 25.0 and 25.6 against 21.0 over its first quarter
(gpu_decode_attention_h200_int8_ptx.md). A coded cache is for memory:
nearly twice the positions or batch rows in the same bytes. A query entry beyond float16's
±65504 would overflow; the bf16 path has no such limit.

Elsewhere (CPU, other dtypes) `attend` is the masked scaled_dot_product_attention it replaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.kernels.decode_ops import INTERPRETED
from lowbit.kv.row_codes import CodedCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves every call
    triton = None

BLOCK_L = 64
"""Cache positions one tensor-core step multiplies: q [heads of a group, D] against k [64, D]."""
TARGET_PROGRAMS = 128
"""Programs a launch should have (about one an SM of an H100 or H200): the written prefix is cut
into enough chunks for that, at most MAX_SPLITS. More chunks cost their merge where the launch is
full already: at 384 (three an SM), batch 16 took 24.1 us over a full 1024-position cache against
20.9 at 128, which cuts no chunk there (gpu_decode_attention_h200_variants.md)."""
STAGES = 3
"""Tiles of keys and values the pipelined loop keeps in flight (32 KB each at head_dim 128): two
took 109.3 us at batch 16 over a full 4096-position cache against 68.1 with three, and four or
five no less than three within noise (gpu_decode_attention_h200_stages.md)."""
WARPS = 4
"""Warps of a program: four hold a 16-row tile's accumulator [16, 128] in 16 registers a thread."""
CODED_TARGET_PROGRAMS = 256
"""TARGET_PROGRAMS over a coded cache, whose tiles take longer to multiply than to read: at batch
16 over a full 4096-position cache 77.4 us at 256 against 112.2 at 128 and 103.2 at 384
(fp8 codes, gpu_decode_attention_h200_fp8_f16.md)."""
MAX_SPLITS = 16
"""Chunks of one (batch row, kv head): their partial results are merged in one load each."""

_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def visible_mask(positions: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (0 / -inf) mask [1, 1, T, max_len] of the cache positions each query at `pos` [T]
    sees (`positions` is arange(max_len)), in the activations' dtype: a boolean mask is converted
    inside every attention call, at launches of its own, so a step makes this once for all its layers."""
    return torch.zeros(1, 1, pos.numel(), positions.numel(), device=positions.device, dtype=dtype).masked_fill_(
        positions > pos.view(-1, 1), float("-inf"))


def masked_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention of q [batch, heads, T, D] over the whole cache under `visible`
    (visible_mask), as [batch, T, heads·D]: what `attend` replaces for one query a row."""
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int) -> torch.Tensor:
    """float64 softmax(q·kᵀ/√D)·v over positions 0..position, each query head reading its group's
    key/value head, as [batch, 1, heads·D]: the slow, obvious definition the tests and the
    benchmark check `attend` against."""
    batch, heads, _, dim = q.shape
    group = heads // keys.shape[1]
    k = keys[:, :, : position + 1].double().repeat_interleave(group, dim=1)
    v = values[:, :, : position + 1].double().repeat_interleave(group, dim=1)
    weights = torch.softmax(q.double() @ k.transpose(-1, -2) / math.sqrt(dim), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, 1, heads * dim)


def attend_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`masked_sdpa` with positions after `pos` masked."""
    positions = torch.arange(keys.shape[2], device=q.device)
    return masked_sdpa(q, keys, values, visible_mask(positions, pos, q.dtype))


def _on_triton(q: torch.Tensor, keys: torch.Tensor | CodedCache, values: torch.Tensor | CodedCache) -> bool:
    if isinstance(keys, CodedCache):
        stored = (keys.codes, keys.scales, keys.latest, values.codes, values.scales, values.latest)
        dtypes_ok = keys.dtype == values.dtype == q.dtype and isinstance(values, CodedCache)
    else:
        stored = (keys, values)
        dtypes_ok = keys.dtype == values.dtype == q.dtype
    return (triton is not None and (q.is_cuda or INTERPRETED) and q.dtype in (torch.bfloat16, torch.float16)
            and dtypes_ok and all(t.is_contiguous() for t in stored) and q.is_contiguous()
            and q.shape[1] % stored[0].shape[1] == 0 and q.shape[-1] <= 256)


def splits_for(batch: int, kv_heads: int, max_len: int, coded: bool = False) -> int:
    """Chunks the written prefix is cut into: enough for TARGET_PROGRAMS (CODED_TARGET_PROGRAMS
    over a coded cache), at most MAX_SPLITS, and no more than the cache has blocks of BLOCK_L positions."""
    target = CODED_TARGET_PROGRAMS if coded else TARGET_PROGRAMS
    return max(1, min(MAX_SPLITS, -(-target // (batch * kv_heads)), -(-max_len // BLOCK_L)))


def _workspace(device: torch.device, rows: int, splits: int, group: int, dim: int):
    """Partial maxima, sums and outputs of every chunk, and one counter per (batch row, kv head),
    kept zero by the kernel's last programs; per stream, so that two decoders running at once
    never count into one counter."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, rows, splits, group, dim)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (torch.empty(rows, splits, group, device=device, dtype=torch.float32),
                           torch.empty(rows, splits, group, device=device, dtype=torch.float32),
                           torch.empty(rows, splits, group, dim, device=device, dtype=torch.float32),
                           torch.zeros(rows, device=device, dtype=torch.int32))
    return _WORKSPACE[key]


def attend(q: torch.Tensor, keys: torch.Tensor | CodedCache, values: torch.Tensor | CodedCache,
           pos: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v over cache positions 0..pos: q [batch, heads, 1, D], keys and values
    [batch, kv_heads, max_len, D] (heads a multiple of kv_heads) or both CodedCache, pos a
    1-element long tensor on q's device. Returns [batch, 1, heads·D], as the attention's output
    projection takes it."""
    coded = isinstance(keys, CodedCache)
    if not _on_triton(q, keys, values):
        if coded:
            keys, values = keys.read_at(pos), values.read_at(pos)
        return attend_torch(q, keys, values, pos)
    key_slots, value_slots = (keys.codes, values.codes) if coded else (keys, values)
    batch, heads, _, dim = q.shape
    kv_heads, max_len = key_slots.shape[1], key_slots.shape[2]
    group = heads // kv_heads
    splits = splits_for(batch, kv_heads, max_len, coded)
    maxima, sums, partials, counters = _workspace(q.device, batch * kv_heads, splits, group, dim)
    out = torch.empty(batch, 1, heads * dim, device=q.device, dtype=q.dtype)
    scales_and_latest = (keys.scales, values.scales, keys.latest, values.latest) if coded else (q,) * 4  # unread
    _attend_kernel[(batch * kv_heads, splits)](
        q, key_slots, value_slots, *scales_and_latest, out, pos, maxima, sums, partials, counters,
        key_slots.stride(0), key_slots.stride(1), key_slots.stride(2), max_len, math.log2(math.e) / math.sqrt(dim),
        KV_HEADS=kv_heads, GROUP=group, GROUP_ROWS=max(16, triton.next_power_of_2(group)), DIM=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_L=BLOCK_L, SPLITS=splits,
        SPLITS_P2=triton.next_power_of_2(splits), GROUP_P2=triton.next_power_of_2(group), CODED=coded,
        PIPELINED=not INTERPRETED, STAGES=STAGES, num_warps=WARPS)
    return out


def compile_for_sm90(codes: str = "*bf16", **constexprs):
    """`_attend_kernel` compiled for sm_90 without a GPU (sm90_compile): for the compile tests and
    benchmarks/gemv_sass.py --attention. `codes` is the cache's element type ("*bf16": a plain
    cache, "*fp8e4nv" or "*i8": a coded one)."""
    from lowbit.kernels import sm90_compile

    coded = codes != "*bf16"
    constexprs = {"BLOCK_L": BLOCK_L, "PIPELINED": True, "STAGES": STAGES, "CODED": coded, **constexprs}
    cached, scales = (codes, "*fp32") if coded else ("*bf16", "*bf16")
    types = {"q_ptr": "*bf16", "k_ptr": cached, "v_ptr": cached, "ks_ptr": scales, "vs_ptr": scales,
             "kl_ptr": "*bf16", "vl_ptr": "*bf16", "out_ptr": "*bf16", "pos_ptr": "*i64",
             "max_ptr": "*fp32", "sum_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "scale_log2": "fp32"}
    aligned = [name for name in _attend_kernel.arg_names
               if name.endswith("_ptr") and name != "pos_ptr" or name.startswith("stride")]
    return sm90_compile.compile_for_sm90(_attend_kernel, types, constexprs, aligned, {"num_warps": WARPS})


if triton is not None:
    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kl_ptr, vl_ptr, out_ptr, pos_ptr, max_ptr, sum_ptr,
                       part_ptr, cnt_ptr, stride_b, stride_h, stride_t, max_len, scale_log2,
                       KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS: tl.constexpr,
                       SPLITS_P2: tl.constexpr, GROUP_P2: tl.constexpr, CODED: tl.constexpr,
                       PIPELINED: tl.constexpr, STAGES: tl.constexpr):
        """Program (b·KV_HEADS + kv head, chunk). Query heads of the group are rows of a
        GROUP_ROWS-row tile (16 at least, for tl.dot), those past GROUP zero and never stored.
        Scores are in log2 units (scale_log2 = log2(e)/√D), so the softmax takes exp2.
        CODED: k and v hold 8-bit codes (int8 or e4m3), ks and vs [batch·KV_HEADS, max_len] their scales, kl
        and vl [batch·KV_HEADS, DIM] the exact entries at the last position."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        length = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, max_len)
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_L) * BLOCK_L
        active = tl.cdiv(length, chunk)
        start = split * chunk
        if start < length:
            b = row // KV_HEADS
            heads = tl.arange(0, GROUP_ROWS)
            d = tl.arange(0, BLOCK_D)
            d_ok = d < DIM
            q_rows = (row * GROUP + heads) * DIM  # q [batch, KV_HEADS·GROUP, 1, DIM]: row·GROUP is b's first head of the group
            q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=(heads < GROUP)[:, None] & d_ok[None, :],
                        other=0.0)
            cache = b * stride_b + (row % KV_HEADS) * stride_h
            ks_ptr += row * max_len
            vs_ptr += row * max_len
            last = length - 1
            if CODED:  # the last position's exact entries: its scores now, its value in each tile's sum
                k_last = tl.load(kl_ptr + row * DIM + d, mask=d_ok, other=0.0).to(tl.float32)
                v_last = tl.load(vl_ptr + row * DIM + d, mask=d_ok, other=0.0).to(tl.float32)
                score_last = tl.sum(q.to(tl.float32) * k_last[None, :], axis=1)
            else:
                v_last = tl.zeros([BLOCK_D], tl.float32)
                score_last = tl.zeros([GROUP_ROWS], tl.float32)
            running_max = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
            running_sum = tl.zeros([GROUP_ROWS], tl.float32)
            acc = tl.zeros([GROUP_ROWS, BLOCK_D], tl.float32)
            end = tl.minimum(start + chunk, length)
            if PIPELINED:  # Triton's pipeliner keeps STAGES tiles of keys and values in flight
                for t0 in tl.range(start, end, BLOCK_L, num_stages=STAGES):
                    t = t0 + tl.arange(0, BLOCK_L)
                    k, v, k_scales, v_scales = _kv_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, cache, t, end, d, stride_t,
                                                        DIM, CODED)
                    running_max, running_sum, acc = _attend_tile(q, k, v, k_scales, v_scales, t, end, last,
                                                                 score_last, v_last, running_max, running_sum, acc,
                                                                 scale_log2, CODED, PIPELINED)
            else:  # the interpreter cannot run `range` over runtime bounds: a while loop, one tile ahead
                t0 = start
                t = t0 + tl.arange(0, BLOCK_L)
                k, v, k_scales, v_scales = _kv_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, cache, t, end, d, stride_t, DIM,
                                                    CODED)
                while t0 < end:
                    k_next, v_next, k_scales_next, v_scales_next = _kv_tile(
                        k_ptr, v_ptr, ks_ptr, vs_ptr, cache, t + BLOCK_L, end, d, stride_t, DIM, CODED)
                    running_max, running_sum, acc = _attend_tile(q, k, v, k_scales, v_scales, t, end, last,
                                                                 score_last, v_last, running_max, running_sum, acc,
                                                                 scale_log2, CODED, PIPELINED)
                    k, v, k_scales, v_scales = k_next, v_next, k_scales_next, v_scales_next
                    t0, t = t0 + BLOCK_L, t + BLOCK_L
            dtype = out_ptr.dtype.element_ty
            out_offs = q_rows[:, None] + d[None, :]  # out [batch, 1, heads·DIM] has q's layout
            store_mask = (heads < GROUP)[:, None] & d_ok[None, :]
            if active == 1:
                tl.store(out_ptr + out_offs, (acc / running_sum[:, None]).to(dtype), mask=store_mask)
            else:
                slot = (row * SPLITS + split) * GROUP + heads
                tl.store(max_ptr + slot, running_max, mask=heads < GROUP)
                tl.store(sum_ptr + slot, running_sum, mask=heads < GROUP)
                tl.store(part_ptr + slot[:, None] * DIM + d[None, :], acc, mask=store_mask)
                tl.debug_barrier()  # every thread's partial stored before the count that publishes them
                count = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
                if count == active - 1:
                    _merge_chunks(max_ptr, sum_ptr, part_ptr, out_ptr, row, active, GROUP, DIM, BLOCK_D,
                                  SPLITS, SPLITS_P2, GROUP_P2)
                    tl.store(cnt_ptr + row, 0)

    @triton.jit
    def _attend_tile(q, k, v, k_scales, v_scales, t, end, last, score_last, v_last, running_max, running_sum, acc,
                     scale_log2, CODED: tl.constexpr, BY_PTX: tl.constexpr):
        """The running softmax (max, sum, unnormalised output) of the query rows after one more
        tile of keys and values at positions t (those at t >= end outside the chunk).

        CODED: k and v are codes, exact in float16 (from e4m3 one conversion instruction a pair),
        so the MMAs run in float16 and each position's scale multiplies its score after the MMA;
        values are scaled by scale / top in float16 before p·v (top the tile's largest scale,
        which multiplies the product after, so the entries stay within ±448 where float16 keeps
        its precision). The last position's score is `score_last` and its value `v_last`, the
        exact entries written there. Dequantizing each tile to bf16 before bf16 MMAs instead took
        91.6 against 77.7 us at batch 16 over a full 4096-position cache
        (gpu_decode_attention_h200_fp8_256.md, code at ee61d15)."""
        at_last = t == last
        if CODED:
            dots = tl.dot(q.to(tl.float16), tl.trans(_codes_to_float16(k, BY_PTX)))
            dots = tl.where(at_last[None, :], score_last[:, None], dots * k_scales[None, :])
        else:
            dots = tl.dot(q, tl.trans(k))
        scores = tl.where((t < end)[None, :], dots * scale_log2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        acc = acc * rescale[:, None]
        if CODED:
            # p·(diag(scales)·codes) as p·(diag(scales / top)·codes)·top, top the tile's largest
            # scale: the entries stay within ±448, where float16 keeps its precision
            top = tl.maximum(tl.max(v_scales, axis=0), 1e-30)
            values = _codes_to_float16(v, BY_PTX) * (v_scales / top).to(tl.float16)[:, None]
            weights = tl.where(at_last[None, :], 0.0, p)
            acc += tl.dot(weights.to(tl.float16), values) * top
            acc += tl.sum(tl.where(at_last[None, :], p, 0.0), axis=1)[:, None] * v_last[None, :]
        else:
            acc += tl.dot(p.to(q.dtype), v)
        return new_max, running_sum * rescale + tl.sum(p, axis=1), acc

    @triton.jit
    def _codes_to_float16(codes, BY_PTX: tl.constexpr):
        """8-bit codes as float16, exactly; e4m3 converts in one instruction a pair. int8 BY_PTX
        (compiled for a GPU; the interpreter runs no PTX) four codes a 32-bit word: each byte, its
        sign bit flipped, placed by a byte permute under 0x64 as the low mantissa of 1024 + 128 +
        code, from which a paired subtract takes 1152: five instructions for four codes, where
        Triton's own conversion spends a quarter-rate I2F and byte permutes on every code."""
        if BY_PTX and codes.dtype == tl.int8:
            halves = tl.inline_asm_elementwise(
                "{ .reg .b32 biased, offset; xor.b32 biased, $2, 0x80808080; mov.b32 offset, 0x64806480;"
                " prmt.b32 $0, biased, 0x64646464, 0x4140; prmt.b32 $1, biased, 0x64646464, 0x4342;"
                " sub.f16x2 $0, $0, offset; sub.f16x2 $1, $1, offset; }",
                "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        else:
            halves = codes.to(tl.float16)
        return halves

    @triton.jit
    def _kv_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, cache, t, end, d, stride_t, DIM: tl.constexpr, CODED: tl.constexpr):
        """Keys and values at positions t (zeros at t >= end and past DIM), and with CODED their
        positions' scales ks[t] and vs[t] (else those two are unused placeholders)."""
        offs = cache + t[:, None] * stride_t + d[None, :]
        valid = t < end
        mask = valid[:, None] & (d < DIM)[None, :]
        k = tl.load(k_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if CODED:
            k_scales = tl.load(ks_ptr + t, mask=valid, other=0.0)
            v_scales = tl.load(vs_ptr + t, mask=valid, other=0.0)
        else:
            k_scales = t.to(tl.float32)
            v_scales = k_scales
        return k, v, k_scales, v_scales


    @triton.jit
    def _merge_chunks(max_ptr, sum_ptr, part_ptr, out_ptr, row, active, GROUP: tl.constexpr, DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                      GROUP_P2: tl.constexpr):
        """out = Σ_c 2^(m_c - M)·acc_c / Σ_c 2^(m_c - M)·l_c over the `active` chunks of `row`, each
        chunk's running max m_c, sum l_c and unnormalised output acc_c, M the largest m_c; HEADS
        query heads at a time, so that one pass's partial outputs stay within 64 registers a thread."""
        HEADS: tl.constexpr = min(GROUP_P2, max(1, 8192 // (SPLITS_P2 * BLOCK_D)))
        c = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, BLOCK_D)
        for h0 in tl.static_range(0, GROUP_P2, HEADS):
            h = h0 + tl.arange(0, HEADS)
            ok = (c < active)[:, None] & (h < GROUP)[None, :]
            slot = (row * SPLITS + c[:, None]) * GROUP + h[None, :]
            maxima = tl.load(max_ptr + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
            sums = tl.load(sum_ptr + slot, mask=ok, other=0.0, cache_modifier=".cg")
            parts = tl.load(part_ptr + slot[:, :, None] * DIM + d[None, None, :], mask=ok[:, :, None] & (d < DIM),
                            other=0.0, cache_modifier=".cg")
            weights = tl.where(ok, tl.exp2(maxima - tl.max(maxima, axis=0)[None, :]), 0.0)
            total = tl.sum(parts * weights[:, :, None], axis=0) / tl.sum(sums * weights, axis=0)[:, None]
            out_offs = (row * GROUP + h)[:, None] * DIM + d[None, :]
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=(h < GROUP)[:, None] & (d < DIM))
