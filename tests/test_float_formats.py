"""Floating-point formats: exact rounding against torch's casts and an element-wise reference,
saturation, the MX and NVFP4 scale rules, bit accounting."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import PER_CHANNEL, PER_TENSOR, FloatFormat, FormatError, MXFormat, NVFP4Format, quantize_matrix
from lowbit.formats.floating import float_format
from lowbit.formats.minifloat import E2M1, E4M3, E5M2, Minifloat


def awkward_values(element: Minifloat, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Random magnitudes over the whole range (subnormals to overflow), every grid value and every
    midpoint between neighbours (the ties), with both signs."""
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(n, generator=g) * torch.exp2(torch.randn(n, generator=g) * element.exponent_bits * 2)
    grid = element.code_values[torch.isfinite(element.code_values)].sort().values
    midpoints = (grid[1:] + grid[:-1]) / 2
    beyond = torch.tensor([element.max * 1.01, element.max * 1.5, element.max * 100, 3e38])
    values = torch.cat([random, grid, midpoints, beyond])
    return torch.cat([values, -values])


@pytest.mark.parametrize("element", [E4M3, E5M2], ids=lambda e: e.name)
def test_fp8_codes_match_torch_casts(element):
    """torch's casts round to nearest even; on in-range values ours must give the same bytes."""
    x = awkward_values(element)
    clamped = x.clamp(-element.max, element.max)
    expected = clamped.to(element.torch_dtype)
    codes = element.encode(x)
    assert torch.equal(codes, expected.view(torch.uint8))
    assert torch.equal(element.decode(codes), expected.float())


def slow_round(element: Minifloat, value: float) -> float:
    """Nearest finite grid value by exhaustive search; a tie goes to the even code (even mantissa);
    beyond ±max, ±max. Written from the definition, sharing nothing with Minifloat.round."""
    if abs(value) >= element.max:
        return math.copysign(element.max, value)
    best_distance = math.inf
    for code in range(1 << (element.bits - 1)):  # non-negative codes
        exponent, mantissa = code >> element.mantissa_bits, code & ((1 << element.mantissa_bits) - 1)
        if exponent == 0:
            grid = mantissa / 2**element.mantissa_bits * 2.0 ** (1 - element.bias)
        else:
            grid = (1 + mantissa / 2**element.mantissa_bits) * 2.0 ** (exponent - element.bias)
        if grid > element.max:
            continue
        distance = abs(abs(value) - grid)
        if distance < best_distance or (distance == best_distance and code % 2 == 0):
            best_distance, best = distance, grid
    return math.copysign(best, value)


@pytest.mark.parametrize("element", [E2M1, E4M3, E5M2], ids=lambda e: e.name)
def test_rounding_matches_elementwise_reference(element):
    x = awkward_values(element, n=400, seed=1)
    expected = torch.tensor([slow_round(element, float(v)) for v in x])
    assert torch.equal(element.round(x), expected)
    assert torch.equal(element.decode(element.encode(x)), expected)


def test_e2m1_grid_and_ties():
    assert E2M1.code_values[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert E2M1.round(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("element", [E2M1, E4M3, E5M2], ids=lambda e: e.name)
def test_saturates_instead_of_overflowing(element):
    x = torch.tensor([element.max * 1.2, -element.max * 7, 1e30, -1e30])
    assert element.round(x).tolist() == [element.max, -element.max, element.max, -element.max]
    assert torch.isfinite(element.decode(element.encode(x))).all()


def test_e5m2_saturates_where_torch_overflows():
    x = torch.tensor([61440.0])  # the tie between 57344 and 65536 (Inf): torch rounds it to Inf
    assert torch.isinf(x.to(torch.float8_e5m2).float()).all()
    assert E5M2.round(x).item() == 57344.0


def test_sign_of_zero_is_kept():
    codes = E4M3.encode(torch.tensor([1e-12, -1e-12, 0.0, -0.0]))
    assert codes.tolist() == [0, 128, 0, 128]


# --- scaled formats --------------------------------------------------------------------------------


def slow_scaled(w: torch.Tensor, element: Minifloat, scale: torch.Tensor) -> torch.Tensor:
    """Element by element: round(w / scale) on the element grid, times the scale."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s = float(scale[r if scale.shape[0] > 1 else 0, c if scale.shape[1] > 1 else 0])
            out[r, c] = slow_round(element, float(torch.tensor(float(w[r, c])) / s)) * s
    return out


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1"])
@pytest.mark.parametrize("group_size", [16, PER_CHANNEL, PER_TENSOR])
def test_float_format_matches_reference(element, group_size):
    torch.manual_seed(0)
    w = torch.randn(6, 48) * torch.rand(6, 1) * 4
    fmt = float_format(element, group_size, "float16")
    q = quantize_matrix(fmt, w)
    size = fmt.group_size_for(48)
    for index, start in enumerate(range(0, 48, size)):
        group = w[:, start : start + size]
        absmax = group.abs().amax() if group_size == PER_TENSOR else group.abs().amax(dim=1, keepdim=True)
        expected_scale = (absmax / fmt.element.max).to(torch.float16).reshape(-1, 1)
        # Scales below float16's normal range are raised to its smallest normal (e5m2's 57344
        # pushes many there); floats are scale-invariant, so only the subnormal range moves.
        expected_scale = expected_scale.clamp(min=torch.finfo(torch.float16).tiny)
        assert torch.equal(q.scale[:, index : index + 1], expected_scale)
        assert torch.equal(q.dequantize()[:, start : start + size], slow_scaled(group, fmt.element, expected_scale))
    assert q.zero is None and q.codes.dtype == torch.uint8


def test_fp8_per_channel_error_is_relative():
    """FP8 E4M3 keeps 3 mantissa bits: every weight above the subnormal range within 2^-4 relative."""
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    q = quantize_matrix(FloatFormat(E4M3, PER_CHANNEL, torch.float32), w)
    normal = w.abs() >= q.scale * 2.0**-6
    assert ((q.dequantize() - w).abs()[normal] <= w.abs()[normal] * 2**-4 * (1 + 1e-6)).all()


def test_mx_scale_follows_the_spec():
    """X = 2^(floor(log2 amax) - 2) for E2M1; a block whose amax / X lies in (6, 8) saturates."""
    torch.manual_seed(0)
    w = torch.randn(4, 64) * 3
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 7.5  # amax 7.5 -> X = 2^(2 - 2) = 1, and 7.5 saturates to 6
    q = quantize_matrix(MXFormat(), w)
    for r in range(4):
        for b in range(2):
            amax = float(w[r, 32 * b : 32 * (b + 1)].abs().max())
            exponent = -127 if amax == 0 else math.floor(math.log2(amax)) - 2
            assert q.scale[r, b].item() == 2.0**exponent
    assert q.dequantize()[1, 5].item() == 6.0
    assert torch.equal(q.dequantize()[0, :32], torch.zeros(32))
    reference = slow_scaled(w, E2M1, q.scale.repeat_interleave(32, dim=1))
    assert torch.equal(q.dequantize(), reference)


def test_nvfp4_scales_and_values():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.exp(torch.randn(8, 1))
    fmt = NVFP4Format().prepare(w)
    assert fmt.global_scale == pytest.approx(448 * 6 / float(w.abs().max()), rel=1e-6)
    q = quantize_matrix(fmt, w)
    # Block scales are E4M3 values (torch's cast leaves them unchanged) and the largest block's is 448.
    assert torch.equal(q.scale.to(torch.float8_e4m3fn).float(), q.scale)
    assert q.scale.max().item() == 448.0
    effective = q.scale / torch.tensor(fmt.global_scale, dtype=torch.float32)
    reference = slow_scaled(w, E2M1, effective.repeat_interleave(16, dim=1))
    assert torch.equal(q.dequantize(), reference)
    # The same numbers as compressed-tensors' dequantizer: e2m1 * (fp8 scale / global), in float32.
    values = E2M1.decode(q.codes).reshape(8, 4, 16)
    ct_style = (values * (q.scale.unsqueeze(-1) / torch.tensor([fmt.global_scale]))).reshape(8, 64)
    assert torch.equal(q.dequantize(), ct_style)


def test_nvfp4_needs_its_tensor_scale_and_prepares_once():
    w = torch.randn(4, 32)
    with pytest.raises(FormatError, match="prepare"):
        NVFP4Format().fit(w[:, :16])
    prepared = NVFP4Format().prepare(w)
    assert prepared.prepare(w * 100) is prepared
    zero = NVFP4Format().prepare(torch.zeros(4, 32))
    assert torch.equal(quantize_matrix(zero, torch.zeros(4, 32)).dequantize(), torch.zeros(4, 32))


def test_bits_per_weight_counts_every_scale():
    assert MXFormat().bits_per_weight(10, 64) == 4.25
    assert NVFP4Format().bits_per_weight(10, 64) == 4.5 + 32 / 640
    assert FloatFormat(E4M3, PER_CHANNEL, torch.float32).bits_per_weight(10, 64) == 8 + 32 / 64
    assert FloatFormat(E4M3, PER_TENSOR, torch.float32).bits_per_weight(10, 64) == 8 + 32 / 640
    assert FloatFormat(E5M2, 16, torch.float16).bits_per_weight(10, 64) == 8 + 1


def test_bad_settings_are_refused():
    with pytest.raises(FormatError, match="unknown minifloat"):
        float_format("e3m4")
    with pytest.raises(FormatError, match="group size"):
        FloatFormat(E4M3, -2)
    with pytest.raises(FormatError, match="positive and finite"):
        NVFP4Format(global_scale=0.0)
    with pytest.raises(FormatError, match="NaN/Inf"):
        quantize_matrix(MXFormat(), torch.tensor([[float("nan")] * 32]))
