"""The GemLite path of the W4A16 dispatcher: its layout built from PackedInt4 computes the same
product as float64 dequantize-then-matmul, is rebuilt when the weight changes, and the dispatcher
only picks paths it was allowed. GPU tests skip without CUDA or without the gemlite package."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16_gemlite
from lowbit.kernels.int4_pack import pack_quantized_weight
from lowbit.kernels.w4a16 import PATHS, use_paths
from test_kernels import (check_dispatcher_allowing, check_layout_follows_in_place_weight_changes, quantized,
                          relative_error)

needs_gemlite = pytest.mark.skipif(not w4a16_gemlite.available(), reason="needs CUDA and the gemlite package")


def test_use_paths_refuses_unknown_names_and_keeps_fused():
    with pytest.raises(ValueError, match="unknown W4A16 path"):
        use_paths("marlin")
    use_paths("gemlite")
    try:
        from lowbit.kernels import w4a16

        assert w4a16._ALLOWED == {"gemlite", "fused"}
    finally:
        use_paths()
    assert w4a16._ALLOWED == set(PATHS)


@needs_gemlite
@pytest.mark.parametrize(
    "m, group_size, symmetric, dtype",
    [(m, 128, sym, torch.bfloat16) for m in (1, 3, 16, 33, 64, 100, 256) for sym in (True, False)]
    + [(1, 64, False, torch.float16), (20, 32, True, torch.float16)],
)
def test_gemlite_matches_float64_dequantize_then_matmul(m, group_size, symmetric, dtype):
    n, k = 384, 1024
    qweight = quantized(n, k, IntegerFormat(4, symmetric=symmetric, group_size=group_size), seed=m)
    packed = pack_quantized_weight(qweight).to("cuda")
    for call in range(2):  # fresh inputs each time: the result must not depend on what ran before
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ qweight.dequantize().double().cuda().T
        out = w4a16_gemlite.matmul(x, packed)
        assert out.dtype == dtype and out.shape == (m, n) and torch.isfinite(out).all()
        # bf16/fp16 operands and scales, and (asymmetric) -zero·scale rounded to the activation dtype.
        assert relative_error(out, ref) < (1e-2 if dtype == torch.bfloat16 else 3e-3)


@needs_gemlite
def test_gemlite_layout_follows_in_place_weight_changes():
    check_layout_follows_in_place_weight_changes(w4a16_gemlite.matmul)


@needs_gemlite
def test_dispatcher_with_gemlite_allowed_handles_act_order_and_records_its_choice():
    check_dispatcher_allowing("gemlite", 320)
