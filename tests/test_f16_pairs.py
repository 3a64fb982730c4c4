"""The GEMV's F16_PAIRS arithmetic (fp16 products of row-scaled x and exact q - z, summed four to a
lane): its error and range on CPU through tests/f16_pairs_emulation.py; on a GPU the kernel
against that emulation, and against float64 over activations of any range."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.base import quantize_matrix
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import triton_available
from lowbit.kernels.int4_pack import pack_quantized_weight
from tests.f16_pairs_emulation import f16_pairs_matmul, row_factors

N, K = 256, 1024


def _packed(symmetric: bool = False, seed: int = 0):
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    qweight = quantize_matrix(IntegerFormat(4, symmetric=symmetric, group_size=128), weight)
    return qweight, pack_quantized_weight(qweight)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def test_row_factors_put_each_rows_largest_value_in_64_to_128():
    x = torch.randn(K, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.arange(-4, 4).repeat(K // 8)
    x[:8] = 0.0
    factor, inverse = row_factors(x.to(torch.bfloat16))
    largest = x.to(torch.bfloat16).double().view(-1, 8).abs().amax(dim=1) * factor
    assert ((largest[1:] >= 64) & (largest[1:] < 128)).all()
    assert inverse[0] == 0 and torch.equal((factor * inverse)[1:], torch.ones(K // 8 - 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 1e3])
def test_fp16_pair_arithmetic_stays_within_a_few_1e4_of_float64(dtype, magnitude):
    """A few 1e-4 relative, bounded at 5e-4: under bf16's output rounding (2^-9), near fp16's (2^-11)."""
    qweight, packed = _packed()
    x = (torch.randn(K, generator=torch.Generator().manual_seed(2)) * magnitude).to(dtype)
    ref = qweight.dequantize().double() @ x.double()
    assert _relative_error(f16_pairs_matmul(x, packed), ref) < 5e-4


def test_rows_of_any_range_stay_accurate():
    """bf16 rows from 1e-30 to 1e30, each scaled on its own: the same bound as rows of one range."""
    qweight, packed = _packed(symmetric=True)
    magnitudes = 10.0 ** torch.randint(-30, 31, (K // 8,), generator=torch.Generator().manual_seed(3))
    x = torch.randn(K, generator=torch.Generator().manual_seed(3)) * magnitudes.repeat_interleave(8)
    x = x.to(torch.bfloat16)
    ref = qweight.dequantize().double() @ x.double()
    out = f16_pairs_matmul(x, packed)
    assert torch.isfinite(out).all() and _relative_error(out, ref) < 5e-4


@pytest.mark.parametrize("code, zero", [(15, 0), (0, 15)])
def test_the_largest_sums_stay_below_fp16s_range(code, zero):
    """Every x' just under 128 and every q - z = +-15: a lane reaches 4 x 15 x 127.5 = 7650 and the
    two lanes' sum 15300, far under 65504 (rounded to fp16's steps of 4 and 8 there)."""
    _, packed = _packed()
    packed.qweight[:] = sum(code << (4 * j) for j in range(8)) - (1 << 32 if code >= 8 else 0)
    packed.zeros[:] = zero
    out = f16_pairs_matmul(torch.full((K,), 127.5).to(torch.bfloat16), packed)
    exact = (code - zero) * 127.5 * 128 * packed.scales.double().sum(dim=0)
    assert torch.isfinite(out).all() and _relative_error(out, exact) < 1e-3


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_kernel_computes_what_the_emulation_says(symmetric):
    """The F16_PAIRS GEMV in fp16 against the emulation rounded to fp16: the same operations in
    the same order up to the float32 sums, so outputs agree to one fp16 step, nearly all exactly."""
    from tests.test_kernels import _run_config
    from lowbit.kernels import w4a16_triton as wt

    _, packed = _packed(symmetric, seed=5)
    x = torch.randn(K, generator=torch.Generator().manual_seed(6)).half()
    expected = f16_pairs_matmul(x, packed).half()
    out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.float16)
    _run_config(wt._gemv_kernel, x[None].cuda(), packed.to("cuda"), 1, 128, 128, 2, False, out, f16=True)
    out = out[0].cpu()
    difference = (out.double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-3)
    assert (out == expected).float().mean() > 0.9 and (difference <= 1.01 * torch.finfo(torch.float16).eps).all()


def _f16_pairs_inputs(dtype: torch.dtype, k: int) -> dict[str, torch.Tensor]:
    """x rows (eight values: one fp16 factor each in F16_PAIRS) far outside fp16's comfortable range."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, k, generator=generator)
    if dtype == torch.bfloat16:
        row_scales = 10.0 ** torch.randint(-6, 7, (k // 8, 1), generator=generator).float()
        cases = {"huge": x * 1e30, "tiny": x * 1e-30, "rows 1e-6..1e6": (x.view(-1, 8) * row_scales).view(1, k)}
    else:  # fp16 in, fp16 out: one row whose fp16 sums of products with codes overflow unscaled
        spikes = torch.zeros(1, k)
        spikes[0, 40:44] = 2e3  # codes 0-3 of row 5: one fp16 lane, up to 4 x 15 x 2e3 = 1.2e5
        cases = {"a row of 2e3": x + spikes, "small": x * 1e-3}
    cases["half the rows zero"] = torch.where(torch.arange(k) % 16 < 8, x, 0.0)
    return {name: value.to(dtype) for name, value in cases.items()}


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block_n, block_k, split", [(128, 128, 2), (512, 32, 4), (1024, 64, 1)])
def test_f16_pairs_gemv_is_as_accurate_as_float32_over_any_activation_range(dtype, block_n, block_k, split):
    """F16_PAIRS sums products in fp16 after scaling each row of eight x values by a power of two:
    inputs of any magnitude (bf16 up to 1e30 and down to 1e-30, rows 12 decades apart, zeros,
    fp16 sums that overflow unscaled) must come out within the output's own rounding plus the
    fp16 arithmetic's few 1e-4 of the float64 reference."""
    from lowbit.kernels import w4a16_triton as wt
    from tests.test_kernels import _run_config, quantized, relative_error

    n, k = 1024, 2048
    qweight = quantized(n, k, IntegerFormat(4, symmetric=False, group_size=128), seed=21)
    packed = pack_quantized_weight(qweight).to("cuda")
    weight = qweight.dequantize().double().cuda()
    for name, x in _f16_pairs_inputs(dtype, k).items():
        x = x.cuda()
        out = torch.full((1, n), float("nan"), device="cuda", dtype=dtype)
        _run_config(wt._gemv_kernel, x, packed, 1, block_n, block_k, split, False, out, f16=True)
        ref = x.double() @ weight.T
        rounding = relative_error(ref.to(dtype), ref)
        assert torch.isfinite(out).all(), name
        # fp16 products and sums add a few 1e-4 (the emulation tests above; 4.4e-4 beside fp16's 2e-4 on
        # an H200, gpu_tests_h200_f16_first.log): far under bf16's rounding, the size of fp16's.
        assert relative_error(out, ref) < rounding + 5e-4, (name, relative_error(out, ref), rounding)
