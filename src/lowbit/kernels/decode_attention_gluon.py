"""decode_attention's kernel over a coded cache (int8 or e4m3 codes, a scale per position and head),
in Gluon: imported only where Triton has Gluon (decode_attention.gluon_import_error says why not).

The Triton kernel reads a tile of codes into the MMAs' operand layouts itself: for the values
(positions along the MMA's K) that is one shared-memory load a byte, then register moves and a
conversion a code, 895 instructions a thread a tile against the bf16 tile's 332
(decode_attention_sass_sm90_int8_ptx.md). Here the layouts are explicit:
  - cp.async brings STAGES tiles of codes and their scales into a ring in shared memory;
  - each thread reads 16 codes of a row in one load, converts them to float16 in registers (the
    values times their scale over the tile's largest, as the Triton kernel rounds them) and
    stores them into a float16 tile in shared memory, once;
  - the MMAs read their operands from those tiles by ldmatrix, as they read a bf16 cache's.
The arithmetic is the Triton kernel's (decode_attention._attend_tile), so the two agree to the
MMAs' order of summation.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl

from lowbit.kernels.decode_attention import INT8_TO_F16_ASM

_barrier = getattr(ttgl, "thread_barrier", None) or ttgl.barrier

@gluon.jit
def _codes_to_float16(codes):
    if codes.dtype == ttgl.int8:
        halves = ttgl.inline_asm_elementwise(INT8_TO_F16_ASM, "=r,=r,r", [codes], dtype=ttgl.float16,
                                             is_pure=True, pack=4)
    else:
        halves = codes.to(ttgl.float16)
    return halves


@gluon.jit
def _request_tile(k_ptr, v_ptr, k_ring, v_ring, slot, t0, end, cache, stride_t, rows, dims):
    """cp.async of the codes of positions t0.. into ring slot `slot`; rows at or past `end` are
    not read and land as zeros."""
    t = t0 + rows
    offs = cache + ttgl.expand_dims(t, 1) * stride_t + ttgl.expand_dims(dims, 0)
    in_chunk = ttgl.expand_dims(t < end, 1) & ttgl.expand_dims(dims >= 0, 0)
    ttgl.nvidia.ampere.async_copy.async_copy_global_to_shared(k_ring.index(slot), k_ptr + offs, mask=in_chunk)
    ttgl.nvidia.ampere.async_copy.async_copy_global_to_shared(v_ring.index(slot), v_ptr + offs, mask=in_chunk)
    ttgl.nvidia.ampere.async_copy.commit_group()


@gluon.jit
def coded_attend_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kl_ptr, vl_ptr, out_ptr, pos_ptr, max_ptr, sum_ptr,
                        part_ptr, cnt_ptr, stride_b, stride_h, stride_t, max_len, scale_log2,
                        KV_HEADS: ttgl.constexpr, GROUP: ttgl.constexpr, DIM: ttgl.constexpr,
                        BLOCK_L: ttgl.constexpr, SPLITS: ttgl.constexpr, SPLITS_P2: ttgl.constexpr,
                        GROUP_P2: ttgl.constexpr, STAGES: ttgl.constexpr, WARPS: ttgl.constexpr):
    """decode_attention._attend_kernel with CODED, for GROUP <= 16 query heads a kv head, DIM a
    power of two from 32 to 256. Program (b·KV_HEADS + kv head, chunk). Each tile's scales are
    loaded a tile ahead straight into the layouts that multiply by them (a key's on its score, a
    value's on its row of codes), so only the codes go through the ring."""
    MMA: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS],
                                                      instr_shape=[16, 8])
    A_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    COLS: ttgl.constexpr = ttgl.SliceLayout(0, MMA)  # a score tile's positions, an output's dims
    ROWS: ttgl.constexpr = ttgl.SliceLayout(1, MMA)  # query heads
    CODE_L: ttgl.constexpr = ttgl.BlockedLayout([1, 16], [512 // DIM, DIM // 16], [WARPS, 1], [1, 0])
    RING_L: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    F16_L: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    row = ttgl.program_id(0)
    split = ttgl.program_id(1)
    length = ttgl.minimum(ttgl.load(pos_ptr).to(ttgl.int32) + 1, max_len)
    chunk = ttgl.cdiv(ttgl.cdiv(length, SPLITS), BLOCK_L) * BLOCK_L
    active = ttgl.cdiv(length, chunk)
    start = split * chunk
    if start < length:
        end = ttgl.minimum(start + chunk, length)
        last = length - 1
        cache = (row // KV_HEADS) * stride_b + (row % KV_HEADS) * stride_h
        ks_ptr += row * max_len
        vs_ptr += row * max_len
        code_type: ttgl.constexpr = k_ptr.dtype.element_ty
        k_ring = ttgl.allocate_shared_memory(code_type, [STAGES, BLOCK_L, DIM], RING_L)
        v_ring = ttgl.allocate_shared_memory(code_type, [STAGES, BLOCK_L, DIM], RING_L)
        k_tile = ttgl.allocate_shared_memory(ttgl.float16, [BLOCK_L, DIM], F16_L)
        v_tile = ttgl.allocate_shared_memory(ttgl.float16, [BLOCK_L, DIM], F16_L)
        code_rows = ttgl.arange(0, BLOCK_L, layout=ttgl.SliceLayout(1, CODE_L))
        code_dims = ttgl.arange(0, DIM, layout=ttgl.SliceLayout(0, CODE_L))
        for s in ttgl.static_range(STAGES - 1):
            _request_tile(k_ptr, v_ptr, k_ring, v_ring, s, start + s * BLOCK_L, end, cache, stride_t, code_rows,
                          code_dims)

        heads = ttgl.arange(0, 16, layout=ROWS)
        dims = ttgl.arange(0, DIM, layout=COLS)
        q_rows = (row * GROUP + heads) * DIM  # q [batch, KV_HEADS·GROUP, 1, DIM]
        q_offs = ttgl.expand_dims(q_rows, 1) + ttgl.expand_dims(dims, 0)
        head_ok = ttgl.expand_dims(heads < GROUP, 1) & ttgl.expand_dims(dims >= 0, 0)
        q = ttgl.load(q_ptr + q_offs, mask=head_ok, other=0.0)
        q_f16 = ttgl.convert_layout(q.to(ttgl.float16), A_L)
        k_last = ttgl.load(kl_ptr + row * DIM + dims).to(ttgl.float32)
        v_last = ttgl.load(vl_ptr + row * DIM + dims).to(ttgl.float32)
        score_last = ttgl.sum(q.to(ttgl.float32) * ttgl.expand_dims(k_last, 0), axis=1)
        running_max = ttgl.full([16], float("-inf"), ttgl.float32, ROWS)
        running_sum = ttgl.zeros([16], ttgl.float32, ROWS)
        acc = ttgl.zeros([16, DIM], ttgl.float32, MMA)
        positions = ttgl.arange(0, BLOCK_L, layout=COLS)
        k_scales_next = ttgl.load(ks_ptr + start + positions, mask=start + positions < end, other=0.0)
        v_scales_next = ttgl.load(vs_ptr + start + code_rows, mask=start + code_rows < end, other=0.0)
        i = 0
        for t0 in range(start, end, BLOCK_L):
            slot = i % STAGES
            ttgl.nvidia.ampere.async_copy.wait_group(STAGES - 2)
            _barrier()  # every thread's copies landed; the float16 tiles and the slot refilled next are free
            _request_tile(k_ptr, v_ptr, k_ring, v_ring, (i + STAGES - 1) % STAGES, t0 + (STAGES - 1) * BLOCK_L,
                          end, cache, stride_t, code_rows, code_dims)
            # the scales one tile ahead, in the layouts that multiply by them
            k_scales, v_scales = k_scales_next, v_scales_next
            k_scales_next = ttgl.load(ks_ptr + t0 + BLOCK_L + positions, mask=t0 + BLOCK_L + positions < end,
                                      other=0.0)
            v_scales_next = ttgl.load(vs_ptr + t0 + BLOCK_L + code_rows, mask=t0 + BLOCK_L + code_rows < end,
                                      other=0.0)
            top = ttgl.maximum(ttgl.max(v_scales, axis=0), 1e-30)
            k_tile.store(_codes_to_float16(k_ring.index(slot).load(CODE_L)))
            relative = ttgl.expand_dims((v_scales / top).to(ttgl.float16), 1)
            v_tile.store(_codes_to_float16(v_ring.index(slot).load(CODE_L)) * relative)
            _barrier()  # the float16 tiles written
            t = t0 + positions
            at_last = ttgl.expand_dims(t == last, 0)
            dots = ttgl.nvidia.ampere.mma_v2(q_f16, k_tile.permute((1, 0)).load(B_L),
                                              ttgl.zeros([16, BLOCK_L], ttgl.float32, MMA))
            dots = ttgl.where(at_last, ttgl.expand_dims(score_last, 1), dots * ttgl.expand_dims(k_scales, 0))
            scores = ttgl.where(ttgl.expand_dims(t < end, 0), dots * scale_log2, float("-inf"))
            new_max = ttgl.maximum(running_max, ttgl.max(scores, axis=1))
            p = ttgl.exp2(scores - ttgl.expand_dims(new_max, 1))
            rescale = ttgl.exp2(running_max - new_max)
            weights = ttgl.convert_layout(ttgl.where(at_last, 0.0, p).to(ttgl.float16), A_L)
            product = ttgl.nvidia.ampere.mma_v2(weights, v_tile.load(B_L), ttgl.zeros([16, DIM], ttgl.float32, MMA))
            acc = acc * ttgl.expand_dims(rescale, 1) + product * top
            acc += ttgl.expand_dims(ttgl.sum(ttgl.where(at_last, p, 0.0), axis=1), 1) * ttgl.expand_dims(v_last, 0)
            running_sum = running_sum * rescale + ttgl.sum(p, axis=1)
            running_max = new_max
            i += 1
        ttgl.nvidia.ampere.async_copy.wait_group(0)  # no copy outlives the program's shared memory
        if active == 1:
            ttgl.store(out_ptr + q_offs, (acc / ttgl.expand_dims(running_sum, 1)).to(out_ptr.dtype.element_ty),
                       mask=head_ok)
        else:
            slots = (row * SPLITS + split) * GROUP + heads
            ttgl.store(max_ptr + slots, running_max, mask=heads < GROUP)
            ttgl.store(sum_ptr + slots, running_sum, mask=heads < GROUP)
            ttgl.store(part_ptr + ttgl.expand_dims(slots, 1) * DIM + ttgl.expand_dims(dims, 0), acc, mask=head_ok)
            _barrier()  # every thread's partial stored before the count that publishes them
            count = ttgl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
            if count == active - 1:
                _merge_chunks(max_ptr, sum_ptr, part_ptr, out_ptr, row, active, GROUP, DIM, SPLITS, SPLITS_P2,
                              GROUP_P2, WARPS)
                ttgl.store(cnt_ptr + row, 0)


@gluon.jit
def _merge_chunks(max_ptr, sum_ptr, part_ptr, out_ptr, row, active, GROUP: ttgl.constexpr, DIM: ttgl.constexpr,
                  SPLITS: ttgl.constexpr, SPLITS_P2: ttgl.constexpr, GROUP_P2: ttgl.constexpr, WARPS: ttgl.constexpr):
    """decode_attention._merge_chunks: out = Σ_c 2^(m_c - M)·acc_c / Σ_c 2^(m_c - M)·l_c over the
    `active` chunks, HEADS query heads a pass."""
    HEADS: ttgl.constexpr = min(GROUP_P2, max(1, 8192 // (SPLITS_P2 * DIM)))
    M3: ttgl.constexpr = ttgl.BlockedLayout([1, 1, 4], [1, 1, 32], [WARPS, 1, 1], [2, 1, 0])
    CH: ttgl.constexpr = ttgl.SliceLayout(2, M3)  # [chunk, head]
    c = ttgl.expand_dims(ttgl.arange(0, SPLITS_P2, layout=ttgl.SliceLayout(1, CH)), 1)
    d = ttgl.expand_dims(ttgl.expand_dims(ttgl.arange(0, DIM, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(0, M3))),
                                          0), 0)
    HD: ttgl.constexpr = ttgl.SliceLayout(0, M3)  # [head, dim]
    d_out = ttgl.expand_dims(ttgl.arange(0, DIM, layout=ttgl.SliceLayout(0, HD)), 0)
    for h0 in ttgl.static_range(0, GROUP_P2, HEADS):
        h = ttgl.expand_dims(h0 + ttgl.arange(0, HEADS, layout=ttgl.SliceLayout(0, CH)), 0)
        ok = (c < active) & (h < GROUP)
        slot = (row * SPLITS + c) * GROUP + h
        maxima = ttgl.load(max_ptr + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
        sums = ttgl.load(sum_ptr + slot, mask=ok, other=0.0, cache_modifier=".cg")
        parts = ttgl.load(part_ptr + ttgl.expand_dims(slot, 2) * DIM + d, mask=ttgl.expand_dims(ok, 2) & (d >= 0),
                          other=0.0, cache_modifier=".cg")
        weights = ttgl.where(ok, ttgl.exp2(maxima - ttgl.expand_dims(ttgl.max(maxima, axis=0), 0)), 0.0)
        denominator = ttgl.convert_layout(ttgl.sum(sums * weights, axis=0), ttgl.SliceLayout(1, HD))
        total = ttgl.sum(parts * ttgl.expand_dims(weights, 2), axis=0) / ttgl.expand_dims(denominator, 1)
        h_out = ttgl.expand_dims(h0 + ttgl.arange(0, HEADS, layout=ttgl.SliceLayout(1, HD)), 1)
        ttgl.store(out_ptr + (row * GROUP + h_out) * DIM + d_out, total.to(out_ptr.dtype.element_ty),
                   mask=(h_out < GROUP) & (d_out >= 0))


def compile_for_sm90(codes: str = "*i8", stages: int = 3, **constexprs):
    """`coded_attend_kernel` compiled for sm_90 without a GPU, pointers and strides declared aligned
    as the JIT finds them on model shapes: for the compile tests and benchmarks/gemv_sass.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = coded_attend_kernel
    constexprs = {"BLOCK_L": 64, "STAGES": stages, "WARPS": 4, **constexprs}
    types = {"q_ptr": "*bf16", "k_ptr": codes, "v_ptr": codes, "ks_ptr": "*fp32", "vs_ptr": "*fp32",
             "kl_ptr": "*bf16", "vl_ptr": "*bf16", "out_ptr": "*bf16", "pos_ptr": "*i64", "max_ptr": "*fp32",
             "sum_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "scale_log2": "fp32"}
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    aligned = {(names.index(name),): [["tt.divisibility", 16]]
               for name in names if name.endswith("_ptr") and name != "pos_ptr" or name.startswith("stride")}
    return triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": constexprs["WARPS"]})
