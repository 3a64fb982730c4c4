"""decode_ops: each Triton kernel against the torch arithmetic it stands in for (the modules' own).

The kernels round where the modules round, so they may differ only by the order of the norm's sum
and the last bit of rsqrt and exp: one or two units in the last place of the output's dtype.
"""

from __future__ import annotations


import pytest
import torch

from lowbit.generate import StaticDecoder
from lowbit.kernels import decode_ops
from lowbit.kernels.w4a16 import triton_available
from lowbit.kv.row_codes import CODES, CodedCache, quantize_rows
from tests.conftest import check_in_triton_interpreter, tiny_llama

gpu = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


def _close(actual: torch.Tensor, expected: torch.Tensor, units: int) -> None:
    """Within `units` units in the last place of the dtype (float32: of a rounding to 1e-6)."""
    eps = 1e-6 if expected.dtype == torch.float32 else torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual.float(), expected.float(), rtol=units * eps, atol=units * eps * 1e-3)


def check_against_torch(device: str, dtype: torch.dtype) -> None:
    """Every op on odd sizes (no power of two), with row slices of one merged projection as inputs."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype)

    hidden, delta, weight = rand(3, 1, 96), rand(3, 1, 96), rand(96) + 1
    for d in (None, delta):
        total, normed = decode_ops.add_rms_norm(hidden, d, weight, 1e-5)
        expected_total, expected = decode_ops._add_rms_norm_torch(hidden, d, weight, 1e-5)
        assert torch.equal(total, expected_total)  # one rounding of the sum in both
        _close(normed, expected, 2)

    heads, kv_heads, dim, max_len = 4, 2, 24, 10
    merged = rand(2, 1, (heads + 2 * kv_heads) * dim, scale=3.0)
    q, k, v = merged.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    angles = torch.arange(dim // 2) * 0.37
    cos = torch.cat([angles.cos(), angles.cos()]).view(1, 1, dim).to(device, dtype)
    sin = torch.cat([angles.sin(), angles.sin()]).view(1, 1, dim).to(device, dtype)
    caches = [rand(2, kv_heads, max_len, dim) for _ in range(2)]
    pos = torch.tensor([6], device=device)
    head_norms = decode_ops.HeadNorms(rand(dim) + 1, rand(dim) + 1, 1e-6, 1e-5)
    for norms, units in ((None, 1), (head_norms, 2)):  # a norm's last bit can move the rotated product's
        mine, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
        rotated = decode_ops.rotate_into_cache(q, k, v, cos, sin, *mine, pos, norms)
        expected = decode_ops._rotate_into_cache_torch(q, k, v, cos, sin, *theirs, pos, norms)
        assert rotated.shape == expected.shape == (2, heads, 1, dim)
        _close(rotated, expected, units)
        _close(mine[0], theirs[0], units)
        assert torch.equal(mine[1], theirs[1])  # values are copied as they are
        untouched = torch.arange(max_len, device=device) != 6
        assert torch.equal(mine[0][:, :, untouched], caches[0][:, :, untouched])

        for codes_dtype in CODES.values():
            check_coded_write(q, k, v, cos, sin, pos, norms, codes_dtype, units, untouched)

    gate_up = rand(2, 1, 2 * 1500, scale=4.0)
    gate, up = gate_up.split([1500, 1500], dim=-1)
    _close(decode_ops.silu_mul(gate, up), decode_ops._silu_mul_torch(gate, up), 1)
    check_pending(device, dtype)


def check_coded_write(q, k, v, cos, sin, pos, norms, codes_dtype, units, untouched) -> None:
    """rotate_into_cache into coded caches against the torch path: the entries kept exact alike, and
    each row's codes and scale exactly what kv.row_codes makes of the entry written."""
    batch, kv_heads, max_len, dim = 2, 2, untouched.numel(), cos.shape[-1]
    mine, theirs = ([CodedCache.empty(batch, kv_heads, max_len, dim, q.device, q.dtype, codes_dtype)
                     for _ in range(2)] for _ in range(2))
    _close(decode_ops.rotate_into_cache(q, k, v, cos, sin, *mine, pos, norms),
           decode_ops._rotate_into_cache_torch(q, k, v, cos, sin, *theirs, pos, norms), units)
    _close(mine[0].latest, theirs[0].latest, units)
    assert torch.equal(mine[1].latest, theirs[1].latest)
    for cache in mine:
        codes, scales = quantize_rows(cache.latest, codes_dtype)
        assert torch.equal(cache.codes[:, :, int(pos)].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(cache.scales[:, :, int(pos)], scales)
        assert not cache.codes[:, :, untouched].view(torch.uint8).any() and not cache.scales[:, :, untouched].any()


def check_pending(device: str, dtype: torch.dtype) -> None:
    """Each op reading a matmul's pending float32 sums: the same result as from the sums rounded to
    the activations' dtype (what the matmul would have returned), and the sums' buffer zero after."""
    g = torch.Generator().manual_seed(1)

    def sums(*shape: int) -> torch.Tensor:
        return (3.0 * torch.randn(*shape, generator=g)).to(device)

    hidden, weight = sums(3, 1, 96).to(dtype), sums(96).to(dtype) + 1
    delta = sums(3, 1, 96)
    rounded = delta.to(dtype, copy=True)  # (a float32 .to() would be the buffer itself)
    total, normed = decode_ops.add_rms_norm(hidden, decode_ops.Pending(delta, dtype), weight, 1e-5)
    expected_total, expected = decode_ops._add_rms_norm_torch(hidden, rounded, weight, 1e-5)
    assert torch.equal(total, expected_total) and not delta.any()
    _close(normed, expected, 2)

    heads, kv_heads, dim, max_len = 4, 2, 24, 10
    merged = sums(2, 1, (heads + 2 * kv_heads) * dim)
    sizes = [heads * dim, kv_heads * dim, kv_heads * dim]
    q, k, v = merged.to(dtype, copy=True).split(sizes, dim=-1)
    angles = torch.arange(dim // 2) * 0.37
    cos = torch.cat([angles.cos(), angles.cos()]).view(1, 1, dim).to(device, dtype)
    sin = torch.cat([angles.sin(), angles.sin()]).view(1, 1, dim).to(device, dtype)
    mine = [torch.zeros(2, kv_heads, max_len, dim, device=device, dtype=dtype) for _ in range(2)]
    theirs = [c.clone() for c in mine]
    pos = torch.tensor([3], device=device)
    rotated = decode_ops.rotate_into_cache(*decode_ops.Pending(merged, dtype).split(sizes), cos, sin, *mine, pos)
    _close(rotated, decode_ops._rotate_into_cache_torch(q, k, v, cos, sin, *theirs, pos), 1)
    _close(mine[0], theirs[0], 1)
    assert torch.equal(mine[1], theirs[1]) and not merged.any()

    gate_up = sums(2, 1, 2 * 1500)
    gate, up = gate_up.to(dtype, copy=True).split([1500, 1500], dim=-1)
    out = decode_ops.silu_mul(*decode_ops.Pending(gate_up, dtype).split([1500, 1500]))
    _close(out, decode_ops._silu_mul_torch(gate, up), 2)  # exp's last bit can move the product's
    assert out.dtype == dtype and not gate_up.any()


def test_pending_products_are_rounded_and_zeroed_on_the_torch_paths():
    """Without Triton each op finishes a pending product itself: rounded, its buffer zeroed."""
    check_pending("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="all pending or all finished"):
        x = torch.zeros(1, 1, 8)
        decode_ops.silu_mul(decode_ops.Pending(x, torch.bfloat16), x)


def test_kernels_in_the_interpreter():
    """The three kernels on CPU through TRITON_INTERPRET=1 (float32 and float16: the interpreter's
    bf16 arithmetic is not the GPU's), in a subprocess since the flag is read at import."""
    pytest.importorskip("triton")
    script = ("import torch\n"
              "from lowbit.kernels import decode_ops\n"
              "from tests.test_decode_ops import check_against_torch\n"
              "assert decode_ops.INTERPRETED\n"
              "for dtype in (torch.float32, torch.float16):\n"
              "    check_against_torch('cpu', dtype)\n"
              "print('ok')\n")
    check_in_triton_interpreter(script, timeout=300)


@pytest.mark.parametrize("codes", [None, "*fp8e4nv", "*i8"])
def test_rotary_products_are_rounded_before_their_sum_in_the_sm90_compile(codes):
    """What the interpreter cannot show: with the compiler's FP fusion on, x·cos was folded into a
    bf16 FMA with the other product, skipping the rounding the module does between them. A coded
    cache's codes come from IEEE divisions, as torch's (Triton's `/` is approximate)."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = decode_ops._rotate_into_cache_kernel
    constexprs = {"HEADS": 4, "KV_HEADS": 2, "DIM": 128, "PENDING": False, "HEAD_NORMS": True,
                  "CODED": codes is not None, "BLOCK": 128}
    cached = {"keys_ptr": codes, "values_ptr": codes, "ks_ptr": "*fp32", "vs_ptr": "*fp32"} if codes else {}
    types = {"pos_ptr": "*i64", "q_eps": "fp32", "k_eps": "fp32", "max_len": "i32", **cached,
             **{name: "i32" for name in kernel.arg_names if name.startswith("stride")}}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "*bf16") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=decode_ops.ROTATE_OPTIONS)
    ptx = compiled.asm["ptx"]
    assert "fma.rn.bf16" not in ptx and "add.rn.bf16" in ptx
    assert ("div.rn.f32" in ptx) == (codes is not None)
    assert ("e4m3" in ptx) == (codes == "*fp8e4nv")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_match_the_torch_arithmetic_on_gpu(dtype):
    check_against_torch("cuda", dtype)


@gpu
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("kv_cache", [None, "fp8", "int8-token"])
def test_fused_decoder_on_gpu_gives_the_module_decoders_tokens(merge, kv_cache):
    """A captured fused step against the modules' step: float32 logits to rounding, same tokens; bf16
    logits within a few of bf16's units (a norm's last bit moves every later layer a little). With
    a coded cache, both quantize what they write and read its codes."""
    from lowbit.kv.spec import spec_of_name

    spec = None if kv_cache is None else spec_of_name(kv_cache)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = tiny_llama(seed=6, tie=False).to("cuda", dtype)
        fused, modules = (StaticDecoder(model, batch=2, max_len=16, merge_projections=merge, fuse=f, kv_cache=spec)
                          for f in (True, False))
        assert fused.fused
        for decoder in (fused, modules):
            decoder.capture()
            decoder.prefill(prompt)
        torch.testing.assert_close(fused.logits, modules.logits, rtol=tolerance, atol=tolerance)
        if dtype == torch.float32:
            assert torch.equal(fused.decode(5), modules.decode(5))
