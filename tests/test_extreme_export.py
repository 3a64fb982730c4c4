"""lowbit's layout for binary weights, sparse outliers and EoRA factors: exact round trips, sizes
that match bits per weight, and a reloaded model with the same logits."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.export.lowbit_layout import describe_format, format_from_description, pack_lowbit_layer, unpack_lowbit_layer
from lowbit.formats.binary import BinaryFormat
from lowbit.formats.integer import IntegerFormat
from lowbit.modules.lowrank_linear import LowRankCorrectedLinear
from lowbit.recipes import Recipe
from lowbit.solvers.binary import Binary
from lowbit.solvers.gptq import GPTQ
from lowbit.solvers.lowrank import LowRankCompensation
from lowbit.solvers.outliers import DenseAndSparse
from lowbit.solvers.rtn import RTN


def stats_for(columns: int) -> HessianStats:
    stats = HessianStats(columns)
    stats.add(torch.randn(256, columns, generator=torch.Generator().manual_seed(0)))
    return stats


CASES = {
    "binary": (Binary(salient_fraction=0.1), BinaryFormat(split=False, group_size=32)),
    "binary split": (Binary(salient_fraction=0.1), BinaryFormat(split=True, group_size=48)),
    "binary plain + eora": (LowRankCompensation(GPTQ(), 4), BinaryFormat(split=False, group_size=32)),
    "int sym outliers": (DenseAndSparse(GPTQ(), 0.01), IntegerFormat(3, True, 32)),
    "int asym outliers + eora": (LowRankCompensation(DenseAndSparse(RTN(), 0.01, "magnitude"), 8),
                                 IntegerFormat(2, False, 32)),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_and_size(case):
    solver, fmt = CASES[case]
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    qweight = solver.solve(w, fmt, stats_for(96))
    tensors = pack_lowbit_layer(qweight)
    description = describe_format(qweight.format)
    back = unpack_lowbit_layer(format_from_description(description), tensors)
    assert torch.equal(back.codes, qweight.codes)
    assert torch.equal(back.dequantize(), qweight.dequantize())
    assert back.bits_per_weight() == pytest.approx(qweight.bits_per_weight())
    stored_bits = 8 * sum(t.numel() * t.element_size() for name, t in tensors.items() if name != "weight_shape")
    # Flat bit planes round up to whole bytes, int32 code words to whole words.
    assert -1e-6 <= stored_bits - qweight.bits_per_weight() * w.numel() < 64 * 3


@pytest.mark.parametrize("recipe", [
    Recipe(method="gptq", bits=3, group_size=32, outliers=0.01, eora_rank=4),
    pytest.param(Recipe(method="binary", format="binary", bits=1, group_size=32, eora_rank=2), marks=pytest.mark.slow),
])
def test_export_reloads_with_the_same_logits(tmp_path, tiny_model_dir, wikitext, recipe):
    from lowbit.api import Settings, quantize
    from lowbit.export import load_quantized

    settings = Settings(calib=str(wikitext / "valid.txt"), samples=4, seq_len=64)
    report = quantize(str(tiny_model_dir), recipe, tmp_path / "out", settings, evaluate_result=False)
    assert report.export_max_abs_diff < 1e-4
    reloaded, _ = load_quantized(tmp_path / "out")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, LowRankCorrectedLinear)
    tensor_bytes = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert tensor_bytes * 8 > report.linear_size.bits  # the quantized part is inside the files
