"""benchmarks/gpu_marlin.py's conversion of scales and zero points into Marlin's order, against a
slow rendering of the rule its docstrings give (the words themselves go through Marlin's own op)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_marlin  # noqa: E402


def _marlin_column(column: int) -> tuple[int, int]:
    """Where a column's zero point lands: (word, nibble) within its group's row."""
    block, offset = divmod(column, 64)
    slot = block * 64 + gpu_marlin.SCALE_PERM.index(offset)  # position after the block's permutation
    word, within = divmod(slot, 8)
    return word, gpu_marlin.ZERO_INTERLEAVE.index(within)


def test_zero_points_land_where_marlin_reads_them():
    torch.manual_seed(0)
    zeros = torch.randint(0, 16, (3, 256)).to(torch.float16)
    packed = gpu_marlin.marlin_zero_points(zeros)
    assert packed.shape == (3, 32) and packed.dtype == torch.int32
    for group in range(3):
        for column in range(256):
            word, nibble = _marlin_column(column)
            assert (int(packed[group, word]) >> (4 * nibble)) & 0xF == int(zeros[group, column])


def test_scales_are_permuted_per_block_of_64():
    scales = torch.arange(2 * 128, dtype=torch.float16).reshape(2, 128)
    permuted = gpu_marlin.marlin_scales(scales)
    assert permuted.dtype == torch.bfloat16
    for group in range(2):
        for slot in range(128):
            block, offset = divmod(slot, 64)
            assert permuted[group, slot] == scales[group, block * 64 + gpu_marlin.SCALE_PERM[offset]].to(torch.bfloat16)
