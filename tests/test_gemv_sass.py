"""benchmarks/gemv_sass.py: the static cost and occupancy of the W4A16 kernels, compiled for sm_90
without a GPU. Its occupancy model is checked against what Nsight Compute reported on an H200
(benchmarks/results/gpu_profile_h200.log: "Block Limit Registers" and "Block Limit Shared Mem")."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def gemv_sass():
    pytest.importorskip("triton")
    return benchmark_script("gemv_sass")


@pytest.mark.parametrize("registers, shared, blocks", [
    (128, 4_100, 4),    # the GEMV, 1x1024x32: limited by registers
    (168, 69_630, 3),   # the tensor-core kernel, 16x128x128: registers and shared memory both allow 3
    (80, 13_500, 6),    # the tensor-core kernel, 16x64x128: registers
])
def test_occupancy_matches_the_profilers_block_limits(gemv_sass, registers, shared, blocks):
    assert gemv_sass.occupancy(registers, shared, warps=4) == f"{registers} reg, {blocks} blocks ({4 * blocks} warps)"


def test_gemv_counts_come_from_its_loops(gemv_sass):
    """One small config compiled for sm_90: every code needs at least its unpack and its FMA, and
    the occupancy line names the registers the compile used."""
    per_code, per_sm = gemv_sass.gemv_opcodes_per_code(256, 64, symmetric=False, unpack="biased")
    assert per_code["FFMA"] >= 1 and per_code["LOP3"] >= 1
    assert 2 < sum(per_code.values()) < 20
    assert per_sm.endswith("warps)") and int(per_sm.split()[0]) <= 255


def test_gluon_counts_come_from_its_loop(gemv_sass):
    """The Gluon tile's loop: one MMA per 4 codes per thread (m16n8k16 over 4 warps), a few
    instructions per code in all; folding the zero points frees registers and, with the codes'
    bias taken off in the same correction, the unpack's subtraction (gluon_sass_sm90.md)."""
    pytest.importorskip("triton.experimental.gluon")
    per_code, per_sm = gemv_sass.gluon_loop(128, 4, symmetric=False, fold_zeros=True)
    assert per_code["HMMA"] == pytest.approx(0.25)
    assert 1.5 < sum(per_code.values()) < 5
    unpacked_registers = int(gemv_sass.gluon_loop(128, 4, symmetric=False, fold_zeros=False)[1].split()[0])
    assert int(per_sm.split()[0]) < unpacked_registers
    symmetric, _ = gemv_sass.gluon_loop(128, 4, symmetric=True, fold_zeros=True)
    assert per_code["HADD2"] < symmetric["HADD2"] - 0.4  # the subtraction, half an instruction per code
    assert sum(per_code.values()) < sum(symmetric.values())


def test_the_gluon_gemv_table_counts_its_loop_per_code(gemv_sass, capsys):
    """A loop step is one group with its K tiles unrolled: about 2.5 instructions per code, where
    a count per K tile would give four times that."""
    pytest.importorskip("triton.experimental.gluon")
    gemv_sass.gluon_gemv_table(["256x32x4"], [2])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 256x32x4")]
    assert [(row[2].strip(), row[3].strip()) for row in rows] == [("2", "asymmetric"), ("2", "symmetric")]
    assert all(1.5 < float(row[4]) < 4 and " reg, " in row[6] for row in rows)


def test_attention_table_counts_one_tile_a_cache(gemv_sass, capsys):
    """decode_attention's tile loop: 32 MMAs a thread over every cache (16 query rows against 64
    positions and back, 4 warps); coded tiles convert their codes (F2FP for e4m3, byte permutes
    and paired subtracts for int8, no quarter-rate I2F), which the bf16 tile does not."""
    gemv_sass.attention_table()
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "reg," in line}
    assert set(rows) == {"bf16", "fp8 codes", "int8 codes"}
    assert "HMMA 32" in rows["bf16"] and "F2FP" not in rows["bf16"] and "I2F" not in rows["int8 codes"]
    assert "F2FP" in rows["fp8 codes"] and "PRMT" in rows["int8 codes"] and "HADD2" in rows["int8 codes"]
    counts = {name: int(line.split("|")[2]) for name, line in rows.items()}
    assert counts["bf16"] < counts["fp8 codes"] < counts["int8 codes"]
