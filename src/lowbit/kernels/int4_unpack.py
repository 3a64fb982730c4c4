"""How the kernels turn packed int4 codes into numbers without int-to-float conversions.

Each helper is a @triton.jit function over int32 words of eight codes (code j in bits 4j..4j+3,
the PackedInt4 layout): `nibble` and `biased_code` give one float32 per code for the CUDA-core
GEMV, `f16_word_dot` sums a whole word against x in packed fp16 (the GEMV's F16_PAIRS, with x
staged by `stage_f16_rows`), and `paired_codes` gives two bf16/fp16 codes per 32-bit operation for
the tensor cores. Each relies on the same fact: OR-ing a small integer into the mantissa of a
power of two gives that power plus the integer, exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nibble(words, J: tl.constexpr, code_mask):
    """Code J (bits 4J..4J+3) of each int32 word as an exact float32, without int-to-float conversion.

    OR-ing a value v < 2^23 into the mantissa of 2^E gives the float 2^E + v·2^(E-23). For J < 5 the
    masked field is code·16^J (< 2^23), so E = 23 - 4J gives 2^E + code and no shift is needed; for
    J >= 5 the code is shifted down first and E = 23. Subtracting 2^E leaves the code.
    """
    if J < 5:
        bits = (words & (code_mask << (4 * J))) | ((150 - 4 * J) << 23)
        base = tl.full([], (150 - 4 * J) << 23, tl.int32).to(tl.float32, bitcast=True)  # 2^(23 - 4J)
    else:
        bits = ((words >> (4 * J)) & code_mask) | (150 << 23)
        base = tl.full([], 150 << 23, tl.int32).to(tl.float32, bitcast=True)  # 2^23
    return bits.to(tl.float32, bitcast=True) - base


@triton.jit
def biased_code(words, J: tl.constexpr, code_mask):
    """Code J of each int32 word as the exact float32 2^(23-P) + code, with the code moved to bits
    P .. P+3 (P = 12 or 16) before the mask-and-or of `nibble`.

    The bias 2^(23-P) is then left in: Σ_j x_j·(2^(23-P_j) + q_j) = Σ_j x_j·q_j + Σ_j x_j·2^(23-P_j),
    and the second sum depends on the row of words only, not on the column, so it is subtracted
    once per row instead of once per code: per code one mask-and-or and one FMA, plus a shift
    shared by two codes. The bias is at most 2^11 times a code step, so the float32 sums keep
    about 13 bits below the codes (`nibble`'s bias of up to 2^23 would leave none).
    """
    P: tl.constexpr = 16 if J == 1 or J == 4 or J == 6 else 12
    SHIFT: tl.constexpr = P - 4 * J
    if SHIFT > 0:
        moved = words << SHIFT
    elif SHIFT < 0:
        moved = words >> (-SHIFT)
    else:
        moved = words
    bits = (moved & (code_mask << P)) | ((150 - P) << 23)
    return bits.to(tl.float32, bitcast=True)


F16_DOT_ASM = tl.constexpr("""
{
.reg .b32 magic, low_mask, high_mask, sixteenth, word_hi, c0, c1, c2, c3, acc;
.reg .b16 low, high;
mov.b32 magic, 0x64006400;
mov.b32 low_mask, 0x000F000F;
mov.b32 high_mask, 0x00F000F0;
mov.b32 sixteenth, 0x2C002C00;
lop3.b32 c0, $1, low_mask, magic, 0xEA;
lop3.b32 c1, $1, high_mask, magic, 0xEA;
shr.u32 word_hi, $1, 8;
lop3.b32 c2, word_hi, low_mask, magic, 0xEA;
lop3.b32 c3, word_hi, high_mask, magic, 0xEA;
sub.rn.f16x2 c0, c0, $6;
fma.rn.f16x2 c1, c1, sixteenth, $7;
sub.rn.f16x2 c2, c2, $6;
fma.rn.f16x2 c3, c3, sixteenth, $7;
mul.rn.f16x2 acc, c0, $2;
fma.rn.f16x2 acc, c1, $3, acc;
fma.rn.f16x2 acc, c2, $4, acc;
fma.rn.f16x2 acc, c3, $5, acc;
mov.b32 {low, high}, acc;
add.rn.f16 low, low, high;
cvt.f32.f16 $0, low;
}
""")
"""PTX for `f16_word_dot`. Codes j and j + 4 of a word sit 16 bits apart: one mask-and-or (LOP3,
immLut 0xEA = (a & b) | c) puts a pair into the mantissas of two fp16 1024.0s, one shift by 8
serves codes 2, 3, 6 and 7. Codes 1, 3, 5 and 7 are masked in place, 16 times too high, and the
FMA that scales them by 1/16 also subtracts 64 + z; codes 0, 2, 4, 6 subtract 1024 + z: either way
q - z exactly. Four packed FMAs then sum x·(q - z) in two fp16 lanes, which are added and widened."""


@triton.jit
def f16x2(high, low):
    """Two float32 tensors as one int32 tensor of fp16 pairs (round to nearest), `high` in bits 16-31."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [high, low], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def f16_word_dot(words, x04, x15, x26, x37, plus_1024_z, minus_64_z):
    """Σ_j x_j·(q_j - z) over the eight codes of each word, as float32, in packed fp16 arithmetic:
    15 SASS instructions for eight codes where the float32 unpack needs about 25. `x04` holds
    the scaled x_0 (bits 0-15) and x_4 (bits 16-31) of the word's row as fp16, and so on; the zero
    point comes as fp16 pairs of 1024 + z and -(64 + z) (F16_DOT_ASM)."""
    return tl.inline_asm_elementwise(F16_DOT_ASM, "=f,r,r,r,r,r,r,r",
                                     [words, x04, x15, x26, x37, plus_1024_z, minus_64_z],
                                     dtype=tl.float32, is_pure=True, pack=1)


F16_ROWS = tl.constexpr(128)
"""Rows of x (eight values each) one pass of `stage_f16_rows` converts: one per thread of 4 warps."""


@triton.jit
def stage_f16_rows(x_ptr, pairs_ptr, inv_ptr, k_begin, k_span):
    """Write x[k_begin : k_begin + k_span] as fp16 pairs for `f16_word_dot`, a row of eight at a time.

    Each row is scaled by a power of two that brings its largest |x| into [64, 128): sums of four
    products with codes (|q - z| <= 15), and of the two lanes, stay below fp16's 65504; every x
    keeps fp16's 11 bits unless it is 2^20 times below its row's largest; bf16 inputs of any range
    are taken. The inverse, which multiplies the row's sums, goes to `inv_ptr`. Staged once per
    program, the conversion costs nothing per code; in the main loop, every thread would convert
    every row it holds (about 20 instructions per row: 0.3 to 0.6 per code).
    """
    rows = tl.arange(0, F16_ROWS)
    n_rows = k_span // 8
    for first in range(0, n_rows, F16_ROWS):
        row = first + rows
        in_span = row < n_rows
        x = tl.load(x_ptr + k_begin + row[:, None] * 8 + tl.arange(0, 8)[None, :], mask=in_span[:, None],
                    other=0.0).to(tl.float32)
        # E, the largest |x|'s float32 exponent field: |x| < 2^(E - 126), and 2^(133 - E) brings it under 128.
        exponent = tl.maximum(tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True) >> 23, 6)
        scaled = x * ((260 - exponent) << 23).to(tl.float32, bitcast=True)[:, None]
        even, odd = tl.split(tl.reshape(scaled, (F16_ROWS, 2, 2, 2)))  # by bit 0 of j
        x04, x26 = tl.split(even)
        x15, x37 = tl.split(odd)
        x0, x4 = tl.split(x04)
        x1, x5 = tl.split(x15)
        x2, x6 = tl.split(x26)
        x3, x7 = tl.split(x37)
        pairs = pairs_ptr + row * 4
        tl.store(pairs, f16x2(x4, x0), mask=in_span)
        tl.store(pairs + 1, f16x2(x5, x1), mask=in_span)
        tl.store(pairs + 2, f16x2(x6, x2), mask=in_span)
        tl.store(pairs + 3, f16x2(x7, x3), mask=in_span)
        tl.store(inv_ptr + row, ((exponent - 6) << 23).to(tl.float32, bitcast=True), mask=in_span)


@triton.jit
def paired_codes(words, J: tl.constexpr, dtype: tl.constexpr):
    """Codes J and J + 4 of each word as exact bf16/fp16 `dtype` values: 2^E + code (E = 7 for
    bf16, 10 for fp16: the code is the low mantissa bits; `paired_offset` gives 2^E + zero point).

    The two codes sit 16 bits apart, so one shift and one mask-and-or fill both halves of a 32-bit
    register: a pair per operation, where the float32 unpack of `nibble` spends one per code and a
    conversion to 16 bits after it. Subtracting 2^E + z is exact in the 16-bit type (small
    integers), so the tensor cores sum x·(q - z) with no rounding of the weight, and the scale
    multiplies their float32 sums once per K tile. sm_90, SWAP_AB, 16x128x128: 4.4 SASS
    instructions per code against 6.4 for the reshaped tile's float32 unpack (mma_sass_sm90.md).
    """
    if dtype == tl.float16:
        pair = ((words >> (4 * J)) & 0x000F000F) | 0x64006400  # 1024.0 in both halves
    else:
        pair = ((words >> (4 * J)) & 0x000F000F) | 0x43004300  # 128.0 in both halves
    return pair.to(tl.int16).to(dtype, bitcast=True), (pair >> 16).to(tl.int16).to(dtype, bitcast=True)


@triton.jit
def paired_offset(zero, dtype: tl.constexpr, SYMMETRIC: tl.constexpr = False):
    """2^E + zero in `dtype`, exact, from the integer zero point by its bits (the exponent of 2^E,
    z in the low mantissa bits, as `paired_codes` builds the codes): what their values minus give
    q - z, with no int-to-float conversion between the zero point's load and the unpack that
    waits for it. With the packed layout's zero points in float16 (int4_pack.py) this tile then
    runs as fast as the symmetric one: 75.8 against 75.7 us (70B gate/up_proj M = 16, 16x64x128
    split 2 paired, gpu_zero_points_h200_bits.md; 85.5 against 74.2 with the conversions,
    gpu_zero_points_h200.md).
    SYMMETRIC: the constant 2^E + 8, which the compiler folds into the subtractions; the bit
    pattern of a constant zero it does not (sm_90, 16x64x128 paired: 4.97 SASS instructions per
    code against 4.55, half of them through shared memory).
    """
    if SYMMETRIC:
        return tl.full(zero.shape, 1032.0 if dtype == tl.float16 else 136.0, dtype)
    if dtype == tl.float16:
        bits = zero | 0x6400  # 1024.0
    else:
        bits = zero | 0x4300  # 128.0
    return bits.to(tl.int16).to(dtype, bitcast=True)
