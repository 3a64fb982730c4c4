"""Integer formats: round trips, exact edge cases, bit accounting, bad input."""

import pytest
import torch

from lowbit.formats import PER_CHANNEL, PER_TENSOR, FormatError, IntegerFormat, quantize_matrix

LAYOUTS = [32, 24, PER_CHANNEL, PER_TENSOR]


def slow_round_trip(fmt: IntegerFormat, w: torch.Tensor) -> torch.Tensor:
    """Element by element, straight from the definitions in the module docstring."""
    out = torch.empty_like(w)
    rows, cols = w.shape
    size = fmt.group_size_for(cols)
    for start in range(0, cols, size):
        block = w[:, start : start + size]
        for r in range(rows):
            values = block if fmt.per_tensor else block[r]
            lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
            if fmt.symmetric:
                scale = max(-lo, hi) / ((2**fmt.bits - 1) / 2)
            else:
                scale = (hi - lo) / (2**fmt.bits - 1)
            scale = max(float(torch.tensor(scale).to(fmt.scale_dtype)), torch.finfo(fmt.scale_dtype).tiny)
            zero = 2 ** (fmt.bits - 1) if fmt.symmetric else min(max(round(-lo / scale), 0), 2**fmt.bits - 1)
            for c in range(block.shape[1]):
                code = min(max(round(float(block[r, c]) / scale) + zero, 0), 2**fmt.bits - 1)
                out[r, start + c] = (code - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", LAYOUTS)
def test_matches_slow_definition(bits, symmetric, group_size):
    torch.manual_seed(bits)
    w = torch.randn(6, 64) * torch.rand(6, 1) * 3
    fmt = IntegerFormat(bits=bits, symmetric=symmetric, group_size=group_size)
    fast = quantize_matrix(fmt, w).dequantize()
    slow = slow_round_trip(fmt, w)
    # Python's round() and torch.round() both round half to even; tie cases are equal.
    assert torch.allclose(fast, slow, atol=1e-6, rtol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step(symmetric):
    w = torch.randn(16, 128)
    fmt = IntegerFormat(bits=4, symmetric=symmetric, group_size=32)
    q = quantize_matrix(fmt, w)
    step = q.scale.float().repeat_interleave(32, dim=1)
    # Half a step, plus the float16 rounding of the scale times the largest code.
    assert ((q.dequantize() - w).abs() <= step * (0.5 + 8 * 2**-11)).all()
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15



@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_and_zero_groups_are_exact(symmetric):
    w = torch.zeros(4, 64)
    w[1] = 0.5
    w[2, :32] = -3.0
    fmt = IntegerFormat(bits=4, symmetric=symmetric, group_size=32)
    q = quantize_matrix(fmt, w)
    back = q.dequantize()
    assert torch.equal(back[0], w[0])
    assert torch.equal(back[3], w[3])
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    if symmetric:
        # The grid spans ±absmax with steps absmax/7.5 on codes -8..7, so both extremes land
        # half a step away (the convention compressed-tensors and GPTQ share).
        for row, cols in ((1, slice(None)), (2, slice(0, 32))):
            assert (back[row, cols] - w[row, cols]).abs().max() <= float(q.scale[row, 0]) * 0.51
    else:
        assert torch.allclose(back, w, atol=1e-3)


def test_tiny_weights_do_not_underflow_scales():
    w = torch.randn(4, 32) * 1e-9
    q = quantize_matrix(IntegerFormat(bits=4, group_size=32), w)
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected(bad):
    w = torch.randn(4, 32)
    w[2, 5] = bad
    with pytest.raises(FormatError, match="NaN/Inf"):
        quantize_matrix(IntegerFormat(), w)


def test_bits_per_weight_counts_scales_and_zeros():
    assert IntegerFormat(bits=4, symmetric=True, group_size=128).bits_per_weight(64, 1024) == 4 + 16 / 128
    assert IntegerFormat(bits=4, symmetric=False, group_size=128).bits_per_weight(64, 1024) == 4 + 20 / 128
    assert IntegerFormat(bits=3, symmetric=False, group_size=PER_CHANNEL).bits_per_weight(10, 100) == 3 + 19 / 100
    assert IntegerFormat(bits=2, symmetric=False, group_size=PER_TENSOR).bits_per_weight(10, 100) == 2 + 18 / 1000
    # A shorter last group still costs a full set of parameters.
    assert IntegerFormat(bits=4, symmetric=True, group_size=128).bits_per_weight(1, 576) == 4 + 5 * 16 / 576


@pytest.mark.parametrize("kwargs", [{"bits": 1}, {"bits": 9}, {"group_size": -2}, {"scale_dtype": torch.int8}])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(FormatError):
        IntegerFormat(**kwargs)


@pytest.mark.parametrize("batch_elements", [1, 3 * 48, 10**9])
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_picks_each_rows_best_ratio(batch_elements, symmetric):
    """Whatever the number of ratios scored per step, each row gets the first ratio (from 1.0 down)
    of least lp error, as a one-ratio-at-a-time loop would choose."""
    from lowbit.solvers.clipping import ClipSearch

    torch.manual_seed(0)
    w = torch.randn(48, 16) ** 3
    w[0] = 0.0  # a constant row: every ratio ties, the first (no shrink) is kept
    fmt = IntegerFormat(bits=3, symmetric=symmetric, group_size=16)
    search = ClipSearch(grid=20, max_shrink=0.5, batch_elements=batch_elements)
    got = search.fit(fmt, w)
    for row in range(w.shape[0]):
        part = w[row : row + 1]
        candidates = [fmt.fit(part, clip=1.0 - step / 20) for step in range(10)]
        errors = [float((fmt.round_trip(part, c) - part).abs().pow(2.4).sum()) for c in candidates]
        best = candidates[errors.index(min(errors))]
        assert torch.equal(got.scale[row], best.scale[0])
        if not symmetric:
            assert torch.equal(got.zero[row], best.zero[0])

def test_clip_search_never_increases_error():
    from lowbit.solvers.rtn import RTN

    torch.manual_seed(0)
    w = torch.randn(32, 256) ** 3  # heavy tails: clipping helps
    for symmetric in (False, True):
        fmt = IntegerFormat(bits=3, symmetric=symmetric, group_size=PER_CHANNEL)
        plain = (RTN().solve(w, fmt).dequantize() - w).pow(2).sum(1)
        clipped = (RTN(clip_search=True).solve(w, fmt).dequantize() - w).abs().pow(2.4).sum(1)
        plain_p = (RTN().solve(w, fmt).dequantize() - w).abs().pow(2.4).sum(1)
        assert (clipped <= plain_p + 1e-4).all()
        assert clipped.sum() < 0.9 * plain_p.sum()
        assert plain.sum() > 0
