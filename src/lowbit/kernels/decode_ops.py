"""The element-wise parts of a Llama decode step, one launch each (generate.StaticDecoder).

Between its matmuls a decode step does little arithmetic: a residual add and an RMSNorm, the
rotary embedding of q and k and their write into the KV cache, SiLU(gate)·up. Run through
transformers' modules that is many tiny kernels per layer (an RMSNorm alone is eight: cast,
square, mean, add, rsqrt, multiply, cast, scale), each a launch of its own even inside a CUDA
graph: a batch-1 step of an 8B-shaped model ran 1308 kernels that way and 405 this way
(benchmarks/results/gpu_decode_h200_separate.md). Each function here is one Triton launch on CUDA and,
elsewhere, the modules' own torch arithmetic. The kernels round
to the activations' dtype where the modules do (after the norm, after each rotary product, after
the SiLU), so the two differ only in the order of the norm's sum and the last bit of rsqrt and exp.

Each function also takes the matmul product it reads as a `Pending`: the float32 sums a lowbit
kernel left unfinished (w4a16.pending_matmul), which it rounds to the activations' dtype as the
matmul would have and zeroes for the next product, so the matmul skips its split-K finish.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lowbit.kv.row_codes import CodedCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch paths below serve every call
    triton = None


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Under Triton's interpreter the kernels also take CPU tensors: how the tests check them without a GPU."""


@dataclass(frozen=True, eq=False)
class Pending:
    """A matmul's product left unfinished: float32 `sums` (a view with unit last stride) in a buffer
    that must be zero again once read, and the dtype the matmul would have rounded them to."""

    sums: torch.Tensor
    dtype: torch.dtype

    def split(self, sizes: list[int], dim: int = -1) -> tuple[Pending, ...]:
        """Column slices, as Tensor.split along the last dimension: a merged projection's parts."""
        if dim != -1:
            raise ValueError("a pending product splits along its last dimension only")
        return tuple(Pending(part, self.dtype) for part in self.sums.split(sizes, dim=-1))

    def finish(self) -> torch.Tensor:
        """The product as the matmul would have returned it, the buffer zeroed (the torch paths' read)."""
        value = self.sums.to(self.dtype)
        self.sums.zero_()
        return value


def _sources(*operands: torch.Tensor | Pending) -> tuple[list[torch.Tensor], bool]:
    """The tensors a kernel reads for `operands` (all pending or none), and whether they are pending."""
    pending = [isinstance(o, Pending) for o in operands]
    if any(pending) and not all(pending):
        raise ValueError("decode_ops takes a matmul's parts all pending or all finished")
    return [o.sums if isinstance(o, Pending) else o for o in operands], all(pending)


def _finished(operand: torch.Tensor | Pending | None) -> torch.Tensor | None:
    return operand.finish() if isinstance(operand, Pending) else operand


def _on_triton(*tensors: torch.Tensor, pending: tuple[torch.Tensor, ...] = ()) -> bool:
    """The Triton path runs on CUDA tensors of one 16/32-bit float dtype and on `pending` float32
    sums, all on one device, rows laid out contiguously."""
    every = tensors + pending
    first = every[0]
    return (triton is not None and (first.is_cuda or INTERPRETED)
            and all(t.dtype == tensors[0].dtype and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
                    for t in tensors)
            and all(p.dtype == torch.float32 for p in pending)
            and all(t.device == first.device and t.stride(-1) == 1 for t in every))


def _rows(t: torch.Tensor, pending: bool = False) -> torch.Tensor:
    """[..., C] as [rows, C]: a view for the decode step's [batch, 1, C] tensors and row slices. A
    pending product's rows must be a view (an error, never a copy): it is zeroed through them."""
    return t.view(-1, t.shape[-1]) if pending else t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------- residual add + RMSNorm

def _rms_norm_torch(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, operation for operation."""
    h = hidden.to(torch.float32)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype)


def _add_rms_norm_torch(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = hidden if delta is None else hidden + delta
    return total, _rms_norm_torch(total, weight, eps)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of `hidden` [..., H] scaled by `weight` [H], as LlamaRMSNorm computes it."""
    return add_rms_norm(hidden, None, weight, eps)[1]


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | Pending | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, RMSNorm(hidden + delta)): a layer's residual add and the norm after it.

    Without `delta`, (hidden, RMSNorm(hidden))."""
    pending = isinstance(delta, Pending)
    source = delta.sums if pending else delta
    operands = [hidden, weight] + ([source] if delta is not None and not pending else [])
    if not _on_triton(*operands, pending=(source,) if pending else ()):
        return _add_rms_norm_torch(hidden, _finished(delta), weight, eps)
    rows = _rows(hidden)
    size = rows.shape[1]
    total = hidden if delta is None else torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
    normed = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
    deltas = rows if delta is None else _rows(source, pending)
    block = triton.next_power_of_2(size)
    _add_rms_norm_kernel[(rows.shape[0],)](rows, deltas, weight, total, normed, size, rows.stride(0),
                                           deltas.stride(0), eps, ADD=delta is not None, PENDING=pending,
                                           BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return total, normed


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, total_ptr, out_ptr, size, stride_h, stride_d, eps,
                             ADD: tl.constexpr, PENDING: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < size
        dtype = out_ptr.dtype.element_ty
        h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
        if ADD:  # the sum rounded to the activations' dtype, as `hidden + delta` is
            d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
            if PENDING:  # rounded as the matmul would have, its buffer zeroed (each lane its own elements)
                d = d.to(dtype)
                tl.store(d_ptr + row * stride_d + offs, tl.zeros_like(d).to(tl.float32), mask=mask)
            h = (h.to(tl.float32) + d.to(tl.float32)).to(dtype)
            tl.store(total_ptr + row * size + offs, h, mask=mask)
        h = h.to(tl.float32)
        normed = (h * tl.rsqrt(tl.sum(h * h, axis=0) / size + eps)).to(dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * size + offs, (w * normed.to(tl.float32)).to(dtype), mask=mask)


# ---------------------------------------------------------------- rotary embedding + KV cache write

ROTATE_OPTIONS = {"num_warps": 1, "enable_fp_fusion": False}
"""Without enable_fp_fusion=False the compiler folds x·cos, rounded, and its sum with the other
product into one unrounded bf16 FMA: 4 units in the last place apart from the module where the two
products nearly cancel (seen on an H200)."""


@dataclass(frozen=True, eq=False)
class HeadNorms:
    """RMSNorms over each head of q and of k, before the rotary embedding (Qwen3's q_norm and
    k_norm): their weights [head_dim] and epsilons."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    q_eps: float
    k_eps: float


def _rotate_into_cache_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, keys: torch.Tensor | CodedCache, values: torch.Tensor | CodedCache,
                             pos: torch.Tensor, norms: HeadNorms | None = None) -> torch.Tensor:
    """The head norms, apply_rotary_pos_emb and the cache writes, as the module path runs them."""
    batch, kv_heads, _, dim = _slots(keys).shape
    q = q.reshape(batch, 1, -1, dim)
    k = k.reshape(batch, 1, kv_heads, dim)
    if norms is not None:
        q, k = _rms_norm_torch(q, norms.q_weight, norms.q_eps), _rms_norm_torch(k, norms.k_weight, norms.k_eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.reshape(batch, 1, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    write_cache(keys, k, pos)
    write_cache(values, v, pos)
    return q


def write_cache(cache: torch.Tensor | CodedCache, x: torch.Tensor, positions: torch.Tensor) -> None:
    """x [batch, kv_heads, T, D] into a static cache at `positions` [T]: copied, or quantized into
    a coded cache's codes (its last position also kept exact)."""
    if isinstance(cache, CodedCache):
        cache.write(x, positions)
    else:
        cache.index_copy_(2, positions, x)


def read_cache(cache: torch.Tensor | CodedCache, length: int, exact: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """A static cache's first `length` positions [batch, kv_heads, length, D] for attention, just
    after `exact` [batch, kv_heads, T, D] was written at `positions` [T]: a view of a plain cache;
    a coded cache's entries dequantized, `exact` at `positions` (CodedCache.read)."""
    if isinstance(cache, CodedCache):
        return cache.read(length, exact, positions)
    return cache[:, :, :length]


def _slots(cache: torch.Tensor | CodedCache) -> torch.Tensor:
    """The [batch, kv_heads, max_len, D] tensor a static cache's entries are stored in."""
    return cache.codes if isinstance(cache, CodedCache) else cache


def rotate_into_cache(q: torch.Tensor | Pending, k: torch.Tensor | Pending, v: torch.Tensor | Pending,
                      cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor | CodedCache,
                      values: torch.Tensor | CodedCache, pos: torch.Tensor,
                      norms: HeadNorms | None = None) -> torch.Tensor:
    """One decode position: normalise each head of q and k where `norms` are given, rotate them by
    (cos, sin) as transformers' apply_rotary_pos_emb does, write the rotated k and v into the caches
    at `pos` (into a coded cache as CodedCache.write does), return q as [batch, heads, 1, head_dim].

    q [batch, 1, heads·D], k and v [batch, 1, kv_heads·D] (row slices of one merged projection are
    fine); cos and sin [1, 1, D]; keys and values [batch, kv_heads, max_len, D], or both CodedCache;
    pos a 1-element long tensor on the device (read there, so a captured step serves every position)."""
    key_slots, value_slots = _slots(keys), _slots(values)
    batch, kv_heads, max_len, dim = key_slots.shape
    coded = isinstance(keys, CodedCache)
    (q_in, k_in, v_in), pending = _sources(q, k, v)
    heads = q_in.shape[-1] // dim
    finished = () if pending else (q_in, k_in, v_in)
    weights = () if norms is None else (norms.q_weight, norms.k_weight)
    stored = (keys.latest, values.latest, keys.scales, values.scales) if coded else (keys, values)
    if (not _on_triton(*finished, *weights, cos, sin, *stored[:2], pending=(q_in, k_in, v_in) if pending else ())
            or not all(t.is_contiguous() for t in (key_slots, value_slots, *stored))):
        return _rotate_into_cache_torch(_finished(q), _finished(k), _finished(v), cos, sin, keys, values, pos, norms)
    q_rows, k_rows, v_rows = (_rows(t, pending) for t in (q_in, k_in, v_in))
    out = torch.empty(batch, heads, 1, dim, device=q_in.device, dtype=q.dtype)
    q_weight, k_weight = weights or (cos, cos)  # not read without norms
    key_scales, value_scales, key_latest, value_latest = (
        (keys.scales, values.scales, keys.latest, values.latest) if coded else (cos,) * 4)  # not read uncoded
    _rotate_into_cache_kernel[(batch, heads + kv_heads)](
        q_rows, k_rows, v_rows, cos.reshape(-1), sin.reshape(-1), out, key_slots, value_slots, pos, q_weight,
        k_weight, key_scales, value_scales, key_latest, value_latest,
        0.0 if norms is None else norms.q_eps, 0.0 if norms is None else norms.k_eps,
        q_rows.stride(0), k_rows.stride(0), v_rows.stride(0), key_slots.stride(0), key_slots.stride(1),
        key_slots.stride(2), max_len, HEADS=heads, KV_HEADS=kv_heads, DIM=dim, PENDING=pending,
        HEAD_NORMS=norms is not None, CODED=coded, BLOCK=triton.next_power_of_2(dim), **ROTATE_OPTIONS)
    return out


if triton is not None:
    @triton.jit
    def _rotate_into_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, out_ptr, keys_ptr, values_ptr, pos_ptr,
                                  qn_ptr, kn_ptr, ks_ptr, vs_ptr, kl_ptr, vl_ptr, q_eps, k_eps,
                                  stride_q, stride_k, stride_v, stride_cb, stride_ch, stride_ct, max_len,
                                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                                  PENDING: tl.constexpr, HEAD_NORMS: tl.constexpr, CODED: tl.constexpr,
                                  BLOCK: tl.constexpr):
        """Program (b, h): query head h, or for h >= HEADS key/value head h - HEADS. PENDING: q, k
        and v are float32 sums, rounded to the output's dtype on load and zeroed once read.
        HEAD_NORMS: the head is first RMS-normalised with weights qn (query heads) or kn (key heads).
        CODED: keys and values are stored as 8-bit codes (the caches' dtype: int8 or e4m3) with
        their scales (ks, vs [batch, KV_HEADS, max_len]) and exactly in kl and vl [batch, KV_HEADS, DIM]."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < DIM
        first_half = offs < DIM // 2
        partner = tl.where(first_half, offs + DIM // 2, offs - DIM // 2)  # rotate_half: (-x2, x1)
        dtype = out_ptr.dtype.element_ty
        kv_row = b * KV_HEADS + h - HEADS  # a key/value head's row of the scales and latest entries
        pos = tl.load(pos_ptr)
        cached = b * stride_cb + (h - HEADS) * stride_ch + pos * stride_ct  # a key/value head's slot
        if h < HEADS:
            src = q_ptr + b * stride_q + h * DIM
            norm_ptr = qn_ptr
            eps = q_eps
        else:
            src = k_ptr + b * stride_k + (h - HEADS) * DIM
            norm_ptr = kn_ptr
            eps = k_eps
            v = tl.load(v_ptr + b * stride_v + (h - HEADS) * DIM + offs, mask=mask, other=0.0).to(dtype)
            if CODED:
                store_coded_row(v, values_ptr + cached, vs_ptr + kv_row * max_len + pos, vl_ptr + kv_row * DIM,
                                 offs, mask)
            else:
                tl.store(values_ptr + cached + offs, v, mask=mask)
            if PENDING:
                tl.store(v_ptr + b * stride_v + (h - HEADS) * DIM + offs, tl.zeros_like(v).to(tl.float32),
                         mask=mask)
        x = tl.load(src + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        rotated = tl.load(src + partner, mask=mask, other=0.0).to(dtype).to(tl.float32)
        if PENDING:  # every lane's partner read done before any lane zeroes its own element
            tl.debug_barrier()
            tl.store(src + offs, tl.zeros_like(x), mask=mask)
        if HEAD_NORMS:  # as the RMSNorm module: normalised and rounded, then times the weight and rounded
            inverse = tl.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
            weight = tl.load(norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            partner_weight = tl.load(norm_ptr + partner, mask=mask, other=0.0).to(tl.float32)
            x = (weight * (x * inverse).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            rotated = (partner_weight * (rotated * inverse).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        rotated = tl.where(first_half, -rotated, rotated)
        cos = tl.load(cos_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # x·cos and rotate_half(x)·sin are each rounded before their sum, as in the module.
        out = ((x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)
        if h < HEADS:
            tl.store(out_ptr + (b * HEADS + h) * DIM + offs, out, mask=mask)
        elif CODED:
            store_coded_row(out, keys_ptr + cached, ks_ptr + kv_row * max_len + pos, kl_ptr + kv_row * DIM, offs,
                             mask)
        else:
            tl.store(keys_ptr + cached + offs, out, mask=mask)

    @triton.jit
    def store_coded_row(x, codes_ptr, scale_ptr, latest_ptr, offs, mask):
        """One row x (activations' dtype, zero where not `mask`) as kv/row_codes.py's quantize_rows
        stores it, int8 or e4m3 as codes_ptr points: scale = max|x| · fl32(1/127 or 1/448), codes
        x / scale (an IEEE division, as torch's) rounded to nearest even, and x itself as the
        latest entry."""
        tl.store(latest_ptr + offs, x, mask=mask)
        x = tl.where(mask, x.to(tl.float32), 0.0)
        if codes_ptr.dtype.element_ty == tl.int8:
            largest = 127.0
            inverse = 0.007874015748031496  # 1/127, rounded to float32 as torch rounds the number it multiplies by
        else:
            largest = 448.0
            inverse = 0.002232142857142857  # 1/448
        scale = tl.max(tl.abs(x), axis=0) * inverse
        safe = tl.where(scale > 0, scale, 1.0)
        scaled = tl.minimum(tl.maximum(tl.div_rn(x, safe), -largest), largest)
        if codes_ptr.dtype.element_ty == tl.int8:
            codes = ((scaled + 12582912.0) - 12582912.0).to(tl.int8)  # 1.5·2^23: float32 spacing 1, ties to even
        else:
            codes = round_to_float8(scaled)
        tl.store(codes_ptr + offs, codes, mask=mask)
        tl.store(scale_ptr, scale)

    @triton.jit
    def round_to_float8(x):
        """x (float32 within ±448) to float8 e4m3, rounded to nearest even as torch rounds. The
        rounding is done here in float32 so that the conversion is exact: Triton 3.6's interpreter
        converts values that round up into the next binade to half their value (e.g. 127.9 to 64)."""
        bits = x.to(tl.int32, bitcast=True)
        # normal numbers (|x| >= 2^-6): 3 mantissa bits, the 20 below rounded off to nearest even
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        # subnormals: multiples of 2^-9, rounded by adding 1.5·2^14, whose float32 spacing is 2^-9
        subnormal = (x + 24576.0) - 24576.0
        return tl.where(tl.abs(x) < 0.015625, subnormal, normal).to(tl.float8e4nv)


# ---------------------------------------------------------------- SiLU(gate) · up

def _silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor | Pending, up: torch.Tensor | Pending) -> torch.Tensor:
    """SiLU(gate)·up for [..., I] tensors (row slices of one merged projection are fine)."""
    (gate_in, up_in), pending = _sources(gate, up)
    if not (_on_triton(pending=(gate_in, up_in)) if pending else _on_triton(gate_in, up_in)):
        return _silu_mul_torch(_finished(gate), _finished(up))
    gate_rows, up_rows = _rows(gate_in, pending), _rows(up_in, pending)
    rows, size = gate_rows.shape
    out = torch.empty(gate_in.shape, device=gate_in.device, dtype=gate.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(size, block))](gate_rows, up_rows, out, size, gate_rows.stride(0),
                                                      up_rows.stride(0), PENDING=pending, BLOCK=block, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, size, stride_g, stride_u, PENDING: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        dtype = out_ptr.dtype.element_ty
        g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        if PENDING:  # float32 sums, rounded above as the matmul would have; zeroed for the next product
            tl.store(g_ptr + row * stride_g + offs, tl.zeros_like(g), mask=mask)
            tl.store(u_ptr + row * stride_u + offs, tl.zeros_like(u), mask=mask)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype)  # rounded, as F.silu's output is
        tl.store(out_ptr + row * size + offs, (silu.to(tl.float32) * u).to(dtype), mask=mask)
