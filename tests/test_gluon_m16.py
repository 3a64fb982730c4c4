"""benchmarks/gpu_gluon_m16.py: the word shuffle its Gluon kernel reads, and that the kernel still
compiles for sm_90 with its unpacked words already in the tensor cores' operand layout (the
compiler asserts the conversion trivial), on whichever Triton is installed."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def gluon_m16():
    pytest.importorskip("triton.experimental.gluon")
    return benchmark_script("gpu_gluon_m16")


def test_each_word_holds_the_codes_of_one_threads_operand_registers(gluon_m16):
    """Word (c, nb, ni, t), nibble 4h + 2·j1 + j0: column 8·nb + ni, K = 32c + 16·j1 + 8·j0 + 2t + h."""
    n, k = 16, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    words = gluon_m16.shuffle_words(codes).reshape(k // 32, n // 8, 8, 4).long() & 0xFFFFFFFF
    for c, nb, ni, t, h, j1, j0 in torch.cartesian_prod(*(torch.arange(s) for s in (2, 2, 8, 4, 2, 2, 2))).tolist():
        nibble = (int(words[c, nb, ni, t]) >> (4 * (4 * h + 2 * j1 + j0))) & 0xF
        assert nibble == int(codes[8 * nb + ni, 32 * c + 16 * j1 + 8 * j0 + 2 * t + h])


@pytest.mark.parametrize("block_n, stages", [(64, 0), (256, 0), (128, 4)])
def test_the_kernel_compiles_with_its_operands_in_place(gluon_m16, block_n, stages):
    ptx = gluon_m16.compile_for_sm90(block_n, stages).asm["ptx"]
    # One group of 128 per loop step: 8 k16 steps x BLOCK_N / 8 n8 tiles over 4 warps.
    assert ptx.count("mma.sync.aligned.m16n8k16") == 8 * block_n // 8 // 4
    assert "sub.rn.bf16x2" in ptx and ("cp.async" in ptx) == bool(stages)


def test_the_profiler_script_takes_a_gluon_config_or_says_how_to_write_one():
    gpu_profile = benchmark_script("gpu_profile")
    assert gpu_profile.parse_gluon_case("70B gate/up_proj@64:8") == ("70B gate/up_proj", 64, 8, 0)
    assert gpu_profile.parse_gluon_case("8B q/o_proj@128:4:4") == ("8B q/o_proj", 128, 4, 4)
    for wrong in ("70B gate/up_proj@64", "70B up@64:8", "8B q/o_proj@64:x"):
        with pytest.raises(SystemExit, match="give SHAPE@BLOCK_N:SPLIT"):
            gpu_profile.parse_gluon_case(wrong)
