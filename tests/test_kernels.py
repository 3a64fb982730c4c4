"""W4A16: the int4 packing, the reference matmul against QuantizedWeight.dequantize(), and (with
CUDA) the Triton kernel against float32 dequantize-then-matmul."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.formats.base import FormatError, QuantizedWeight, quantize_matrix
from lowbit.formats.integer import PER_CHANNEL, PER_TENSOR, IntegerFormat
from lowbit.kernels import pack_int4, reference_w4a16_matmul, triton_available, unpack_int4, w4a16_matmul
from lowbit.kernels.w4a16 import PATHS
from lowbit.kernels.int4_pack import pack_quantized_weight

gpu = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
REPO = Path(__file__).resolve().parents[1]


def quantized(rows: int, columns: int, fmt: IntegerFormat, seed: int = 0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    return quantize_matrix(fmt, torch.randn(rows, columns, generator=generator))


def act_order_quantized(rows: int, columns: int, seed: int) -> QuantizedWeight:
    """An asymmetric g128 weight whose columns were processed in a shuffled (act-order) order."""
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    qweight = quantized(rows, columns, fmt, seed=seed)
    perm = torch.randperm(columns, generator=torch.Generator().manual_seed(4))
    return QuantizedWeight(fmt, qweight.codes[:, perm], qweight.scale, qweight.zero, qweight.group_index[perm])


def test_pack_round_trip_covers_every_code_and_position():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (24, 64), generator=generator, dtype=torch.uint8)
    codes[0, :16] = torch.arange(16, dtype=torch.uint8)  # every nibble value, including 15 in bit 28..31
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (8, 24)
    assert torch.equal(unpack_int4(words, 64), codes)
    # The documented bit layout: code j of a word sits in bits 4j .. 4j+3.
    assert int(words[0, 0]) & 0xF == int(codes[0, 0]) and (int(words[0, 0]) >> 4) & 0xF == int(codes[0, 1])


def test_pack_matches_the_word_by_word_definition():
    """Every word against the layout as documented, summed one code at a time in Python integers."""
    codes = torch.randint(0, 16, (5, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    words = pack_int4(codes)
    for k8 in range(4):
        for n in range(5):
            word = sum(int(codes[n, 8 * k8 + j]) << (4 * j) for j in range(8))
            assert int(words[k8, n]) == (word - (1 << 32) if word >= 1 << 31 else word)


def test_pack_refuses_codes_or_widths_it_cannot_hold():
    with pytest.raises(FormatError, match="divisible by 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(FormatError, match="above 15"):
        pack_int4(torch.full((2, 8), 16, dtype=torch.uint8))


@pytest.mark.parametrize(
    "fmt",
    [
        IntegerFormat(4, symmetric=True, group_size=128),
        IntegerFormat(4, symmetric=False, group_size=128),
        IntegerFormat(4, symmetric=False, group_size=32),
        IntegerFormat(4, symmetric=True, group_size=PER_CHANNEL),
        IntegerFormat(4, symmetric=False, group_size=PER_TENSOR, scale_dtype=torch.bfloat16),
    ],
    ids=lambda f: f.describe(),
)
def test_packed_weight_dequantizes_exactly_like_the_quantized_weight(fmt):
    qweight = quantized(48, 256, fmt)
    packed = pack_quantized_weight(qweight)
    assert torch.equal(packed.dequantize(), qweight.dequantize())
    assert packed.symmetric == fmt.symmetric


def test_reference_matmul_is_dequantize_then_matmul():
    qweight = quantized(40, 256, IntegerFormat(4, symmetric=False, group_size=64))
    packed = pack_quantized_weight(qweight)
    x = torch.randn(3, 5, 256)
    expected = x @ qweight.dequantize().T
    torch.testing.assert_close(reference_w4a16_matmul(x, packed), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w4a16_matmul(x, packed), expected, rtol=1e-5, atol=1e-5)


def test_act_order_groups_become_contiguous_through_an_input_permutation():
    fmt = IntegerFormat(4, symmetric=False, group_size=32)
    qweight = quantized(16, 128, fmt)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    # Same stored values, columns listed in a shuffled order with their groups (as act-order saves them).
    shuffled = QuantizedWeight(fmt, qweight.codes[:, perm], qweight.scale, qweight.zero, qweight.group_index[perm])
    assert not shuffled.has_trivial_group_index
    packed = pack_quantized_weight(shuffled)
    assert packed.input_perm is not None
    assert torch.equal(packed.dequantize(), shuffled.dequantize())
    x = torch.randn(4, 128)
    torch.testing.assert_close(w4a16_matmul(x, packed), x @ shuffled.dequantize().T, rtol=1e-5, atol=1e-5)


def test_formats_the_kernel_cannot_hold_are_refused_with_advice():
    with pytest.raises(FormatError, match="4-bit integer"):
        pack_quantized_weight(quantized(8, 64, IntegerFormat(3, group_size=32)))
    with pytest.raises(FormatError, match="multiple of the group size"):
        pack_quantized_weight(quantized(8, 96, IntegerFormat(4, group_size=64)))
    asymmetric = quantized(8, 64, IntegerFormat(4, symmetric=False, group_size=32))
    for zero in (asymmetric.zero + 0.5, asymmetric.zero + 16):  # fractional; beyond a 4-bit code
        with pytest.raises(FormatError, match="whole numbers 0..15"):
            pack_quantized_weight(dataclasses.replace(asymmetric, zero=zero))
    packed = pack_quantized_weight(quantized(8, 64, IntegerFormat(4, group_size=32)))
    with pytest.raises(ValueError, match="expects 64"):
        w4a16_matmul(torch.randn(2, 32), packed)


# --- GPU ------------------------------------------------------------------------------------------


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check_layout_follows_in_place_weight_changes(matmul) -> None:
    """A path that keeps its own layout of a weight (GemLite, FBGEMM) rebuilds it when the packed
    buffers are overwritten in place, as load_state_dict does to a QuantLinear's."""
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    first, second = quantized(256, 512, fmt, seed=1), quantized(256, 512, fmt, seed=2)
    packed = pack_quantized_weight(first).to("cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    matmul(x, packed)
    replacement = pack_quantized_weight(second).to("cuda")
    packed.qweight.copy_(replacement.qweight)
    packed.scales.copy_(replacement.scales)
    packed.zeros.copy_(replacement.zeros)
    ref = x.double() @ second.dequantize().double().cuda().T
    assert relative_error(matmul(x, packed), ref) < 1e-2


def check_dispatcher_allowing(path: str, out_features: int, leading: tuple[int, ...] = (2, 5)) -> None:
    """With `path` allowed, the dispatcher gives the right product for an act-order weight (a
    gather of x, shaped [*leading, K], first) and records its choice, `path` or the fused kernels."""
    from lowbit.kernels.w4a16 import path_table, use_paths

    shuffled = act_order_quantized(out_features, 512, seed=3)
    packed = pack_quantized_weight(shuffled).to("cuda")
    use_paths(path)
    try:
        x = torch.randn(*leading, 512, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ shuffled.dequantize().double().cuda().T
        assert relative_error(w4a16_matmul(x, packed), ref) < 1e-2
        chosen = [chosen for key, chosen in path_table().items() if key[3:5] == (out_features, 512)]
        assert chosen and chosen[0] in ("fused", path)
    finally:
        use_paths()


@gpu
@pytest.mark.parametrize(
    "m, group_size, symmetric, dtype",
    [(m, 128, sym, torch.bfloat16) for m in (1, 16, 33, 64, 100, 256) for sym in (True, False)]
    + [(5, 64, False, torch.bfloat16), (16, 32, True, torch.bfloat16), (1, 128, False, torch.float16),
       (100, 128, True, torch.float16), (1, 64, False, torch.bfloat16), (1, 32, True, torch.bfloat16),
       (1, 1024, False, torch.bfloat16)],
)
def test_triton_kernel_matches_float32_dequantize_then_matmul(m, group_size, symmetric, dtype):
    n, k = 320, 1024  # N not a multiple of any N tile: the masked edge is exercised
    qweight = quantized(n, k, IntegerFormat(4, symmetric=symmetric, group_size=group_size), seed=m)
    packed = pack_quantized_weight(qweight).to("cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    ref = x.double() @ qweight.dequantize().double().cuda().T
    out = w4a16_matmul(x, packed)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    # Operands rounded to bf16 (8-bit mantissa) / fp16 (11-bit), accumulated in float32.
    assert relative_error(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@gpu
def test_triton_kernel_with_act_order_permutation_and_3d_input():
    shuffled = act_order_quantized(256, 512, seed=7)
    packed = pack_quantized_weight(shuffled).to("cuda")
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ shuffled.dequantize().double().cuda().T
    assert relative_error(w4a16_matmul(x, packed), ref) < 1e-2


@gpu
def test_bench_kernels_times_every_column_of_a_row():
    """One shape of `lowbit bench kernels` end to end: each column a positive time, every lowbit
    product checked (the run raises otherwise), the table rendered with its targets."""
    from lowbit.bench import kernels

    result = kernels.run(["8B k/v_proj"], m_values=(1, 16))
    assert [row["M"] for row in result["rows"]] == [1, 16]
    for row in result["rows"]:
        times = {key: value for key, value in row.items() if key.endswith("_us")}
        assert {"bf16_us", "lowbit_sym_us", "lowbit_asym_us", "roofline_us"} <= times.keys()
        assert all(value > 0 for value in times.values()), times
        assert row["rel_err_lowbit_asym"] < kernels.MAX_RELATIVE_ERROR
    assert "Targets" in kernels.markdown_table(result)


@pytest.mark.skipif(triton_available(), reason="checks the message shown where there is no GPU")
def test_bench_kernels_without_a_gpu_is_a_one_line_error(capsys):
    from lowbit.cli import main

    assert main(["bench", "kernels", "--m", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def _run_config(kernel, x, packed, block_m, block_n, block_k, split, swap, out, biased=False, paired=False,
                f16=False, pipeline=2):
    """One launch of a W4A16 Triton kernel with a fixed config (no autotuning); the split-K sums and
    counters it used come back."""
    import triton

    from lowbit.kernels import w4a16_triton as wt

    m, n, k = x.shape[0], packed.out_features, packed.in_features
    ws, counters = wt.split_k_workspace(x.device, m * n)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    buffers = [x, packed.qweight, packed.scales, zeros, out, ws, counters]
    if kernel is wt._gemv_kernel:
        rows, extra = 1, {"BIASED": biased, "F16_PAIRS": f16, "PIPELINE": pipeline}
        buffers.append(wt.staging(x.device, n, k))
    else:
        rows, extra = triton.cdiv(m, block_m), {"PAIRED_DOTS": paired}
    kernel[(rows * triton.cdiv(n, block_n), split)](
        *buffers, m, n, k, x.stride(0), packed.qweight.stride(0), packed.scales.stride(0), out.stride(0),
        wt.bucket(m), wt.CODE_MASK, GROUP=packed.group_size, SYMMETRIC=packed.symmetric,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, SPLIT=split > 1, SWAP_AB=swap,
        **extra)
    return ws[: m * n], counters[: m * n]


@gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(
    "m, block_m, block_n, block_k, split, swap, unpack",
    [(1, 1, 64, 128, 1, False, "nibble"), (1, 1, 128, 128, 2, False, "nibble"), (1, 1, 256, 128, 8, False, "nibble"),
     (1, 1, 512, 32, 8, False, "biased"), (1, 1, 512, 64, 4, False, "biased"), (1, 1, 1024, 32, 2, False, "biased"),
     (1, 1, 2048, 32, 1, False, "biased"),
     (1, 1, 128, 128, 2, False, "f16"), (1, 1, 256, 64, 8, False, "f16"),
     (1, 1, 512, 32, 8, False, "f16"), (1, 1, 512, 64, 1, False, "f16"), (1, 1, 1024, 32, 2, False, "f16"),
     (1, 1, 1024, 64, 4, False, "f16"), (1, 1, 2048, 32, 1, False, "f16"),
     (7, 16, 64, 128, 1, False, None), (7, 16, 64, 128, 4, False, None), (7, 16, 128, 128, 2, True, None),
     (16, 16, 64, 128, 8, True, None), (50, 64, 64, 128, 2, False, None), (50, 64, 128, 128, 4, True, None),
     (100, 64, 256, 128, 1, True, None), (300, 128, 128, 128, 1, True, None)],  # large-M tiles, swapped
)
@pytest.mark.parametrize("variant", [False, True], ids=["plain", "paired-dots-or-pipeline-4"])
def test_every_kernel_config_matches_the_reference_and_leaves_the_workspace_zero(
        m, block_m, block_n, block_k, split, swap, unpack, symmetric, variant):
    """Each split-K config, called three times on fresh inputs into a NaN-poisoned output: every
    element written, right each time (the self-resetting workspace), workspace zero afterwards.
    `variant`: PAIRED_DOTS for the tensor-core kernel, four pipeline stages (not two) for F16_PAIRS."""
    if m == 1 and unpack != "f16" and variant:
        pytest.skip("the GEMV's float32 unpacks have no variant")
    switches = {"paired": variant} if m > 1 else {"biased": unpack == "biased", "f16": unpack == "f16",
                                                  "pipeline": 4 if variant else 2}
    for call in range(3):
        _check_one_launch(m, 1024, block_m, block_n, block_k, split, swap, symmetric, seed=10 * m + call, **switches)


@gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block_n, block_k", [(128, 128), (256, 64), (512, 32), (512, 64), (1024, 32)])
@pytest.mark.parametrize("split, stages", [(1, 2), (2, 3), (8, 4), (32, 4)])
def test_f16_gemv_pipelines_match_the_reference_and_leave_the_workspace_zero(block_n, block_k, split, stages,
                                                                            symmetric):
    """F16_PAIRS's pipelined loop over K tiles, from more tiles than stages (K = 4096, split 1: 32
    to 128 tiles) to fewer (split 32: one group, 1 to 4 tiles), three calls each."""
    for call in range(3):
        _check_one_launch(1, 4096, 1, block_n, block_k, split, False, symmetric, seed=call, f16=True,
                          pipeline=stages)


def _check_one_launch(m, k, block_m, block_n, block_k, split, swap, symmetric, seed, **switches):
    """One launch of a fixed config on a fresh [320, k] weight into a NaN-poisoned bf16 output: every
    element written, within bf16's bound of float64, and the split-K workspace left zero."""
    from lowbit.kernels import w4a16_triton as wt

    n = 320  # not a multiple of any N tile: the masked edge is exercised
    qweight = quantized(n, k, IntegerFormat(4, symmetric=symmetric, group_size=128), seed=seed)
    packed = pack_quantized_weight(qweight).to("cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    kernel = wt._gemv_kernel if m == 1 else wt._mma_kernel
    ws, counters = _run_config(kernel, x, packed, block_m, block_n, block_k, split, swap, out, **switches)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "some outputs were never written"
    assert relative_error(out, x.double() @ qweight.dequantize().double().cuda().T) < 1e-2
    assert not ws.any() and not counters.any(), "split-K workspace not reset to zero"


@pytest.mark.parametrize("paired", [False, True], ids=["tile", "paired-dots"])
@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap-ab"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tensor_core_kernel_compiles_for_hopper(paired, swap, dtype):
    """The interpreter runs Python semantics; compiling for sm_90 catches what only the compiler
    refuses, such as mismatched shapes on a branch not taken."""
    pytest.importorskip("triton")
    from lowbit.kernels import w4a16_triton as wt

    constexprs = {"GROUP": 128, "SYMMETRIC": False, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": True,
                  "SWAP_AB": swap, "PAIRED_DOTS": paired}
    compiled = wt.compile_for_sm90(wt._mma_kernel, constexprs, warps=4, stages=4, activations=dtype)
    assert compiled.asm["cubin"]


@pytest.mark.parametrize("block_n, block_k, unpack, symmetric, activations",
                         [(64, 128, "nibble", False, "bf16"), (64, 128, "biased", True, "bf16"),
                          (1024, 32, "biased", False, "bf16"), (1024, 32, "nibble", True, "bf16"),
                          (512, 32, "f16", False, "bf16"), (1024, 32, "f16", True, "fp16")])
def test_gemv_compiles_for_hopper(block_n, block_k, unpack, symmetric, activations):
    """Both row-sum layouts (tiles narrower than 128 columns and not), the three unpacks;
    F16_PAIRS's inline PTX is assembled only here and on a GPU (the interpreter cannot run it)."""
    pytest.importorskip("triton")
    from lowbit.kernels import w4a16_triton as wt

    constexprs = {"GROUP": 128, "SYMMETRIC": symmetric, "BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "SPLIT": True, "SWAP_AB": False, "BIASED": unpack == "biased", "F16_PAIRS": unpack == "f16"}
    compiled = wt.compile_for_sm90(wt._gemv_kernel, constexprs, warps=wt.GEMV_WARPS.value, stages=3,
                                   activations=activations)
    assert compiled.asm["cubin"]


@pytest.mark.parametrize("block_n, block_k, stages", [(128, 128, 2), (512, 32, 3), (1024, 32, 4)])
def test_f16_gemv_loads_its_words_asynchronously_for_hopper(block_n, block_k, stages):
    """F16_PAIRS's loop is software-pipelined: Triton turns its loads into cp.async copies to
    shared memory, and more stages hold more of them (one shared buffer per stage)."""
    pytest.importorskip("triton")
    from lowbit.kernels import w4a16_triton as wt

    def compiled(pipeline):
        constexprs = {"GROUP": 128, "SYMMETRIC": False, "BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": block_k,
                      "SPLIT": True, "SWAP_AB": False, "F16_PAIRS": True, "PIPELINE": pipeline}
        return wt.compile_for_sm90(wt._gemv_kernel, constexprs, warps=wt.GEMV_WARPS.value, stages=3)

    deep, shallow = compiled(stages), compiled(stages - 1)
    assert "cp.async" in deep.asm["ptx"]
    assert deep.metadata.shared > shallow.metadata.shared
    # The words travel 16 bytes a copy. Where Triton could not prove their alignment (a word
    # address through a division by a run-time stride, Triton 3.6), each of a thread's words per
    # tile was a 4-byte copy of its own, in every stage: 70B gate/up_proj M = 1 took 43.4 us
    # against 39.6 (gpu_kernels_h200_m1_unaligned_words.md, gpu_kernels_h200_m1_tiles_control.md).
    words_per_thread = block_k // 8 * block_n // (32 * wt.GEMV_WARPS.value)
    four_byte = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (?:0x4|4),", deep.asm["ptx"])
    assert len(four_byte) < words_per_thread


def test_tuned_config_names_the_autotuners_choice_for_this_shape(monkeypatch):
    """The bench's "fused tile" column: the cached config whose key leads with this (M bucket, N, K,
    group, symmetric), described; None where nothing was tuned for it yet."""
    pytest.importorskip("triton")
    from lowbit.kernels import w4a16_triton as wt

    packed = pack_quantized_weight(quantized(48, 256, IntegerFormat(4, symmetric=False, group_size=128)))
    chosen = wt._config(16, 128, 128, 4, 4, 4, True, PAIRED_DOTS=True)
    other = wt._config(64, 64, 128, 1, 4, 4)
    monkeypatch.setattr(wt._decode, "cache", {(16, 96, 256, 128, False, "torch.bfloat16"): other,
                                             (16, 48, 256, 128, False, "torch.bfloat16"): chosen})
    monkeypatch.setattr(wt._gemv, "cache", {})
    assert wt.tuned_config(9, packed) == "16x128x128 split 4 swap paired"
    assert wt.tuned_config(40, packed) is None  # bucket 64: not tuned
    assert wt.tuned_config(1, packed) is None


def test_pinned_config_leaves_one_named_candidate_and_restores_the_rest():
    """gpu_profile.py profiles the config a benchmark chose: every candidate's name is unique, so
    a name selects exactly it; the full list comes back after the block, a wrong name is refused."""
    pytest.importorskip("triton")
    from lowbit.kernels import w4a16_triton as wt

    for m in (1, 16, 256):
        kernel = wt._autotuned(m)
        names = [wt._describe(config) for config in kernel.configs]
        assert len(set(names)) == len(names)
        before = list(kernel.configs)
        with wt.pinned_config(m, names[-1]):
            assert [wt._describe(config) for config in kernel.configs] == [names[-1]]
        assert kernel.configs == before
    with pytest.raises(ValueError, match="no config is named .* M=1.s W4A16 configs"):
        with wt.pinned_config(1, "1x3x3 split 5"):
            pass


@gpu
def test_tuned_config_is_recorded_after_a_call():
    from lowbit.kernels import w4a16_triton as wt

    qweight = quantized(320, 1024, IntegerFormat(4, symmetric=False, group_size=128), seed=5)
    packed = pack_quantized_weight(qweight).to("cuda")
    for m in (1, 16):
        wt.matmul(torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16), packed)
        assert wt.tuned_config(m, packed).startswith("1x" if m == 1 else "16x")


_TUNE_ONCE = """
import sys, torch
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.base import quantize_matrix
from lowbit.kernels import w4a16_triton as wt
from lowbit.kernels.int4_pack import pack_quantized_weight

weight = torch.randn(320, 1024, generator=torch.Generator().manual_seed(8))
packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), weight)).to("cuda")
if sys.argv[1] == "again":
    def timed_again(*args, **kwargs):
        raise AssertionError("a shape tuned by an earlier process was timed again")
    wt._gemv._bench = wt._decode._bench = timed_again
for m in (1, 16):
    wt.matmul(torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16), packed)
    print(wt.tuned_config(m, packed))
"""


@gpu
def test_a_later_process_loads_the_tuned_config_instead_of_timing_every_candidate(tmp_path):
    """The first call per shape compiles and times every candidate (most of `lowbit generate`'s
    warm-up); Triton's cache directory keeps the outcome, so the next process only loads it."""
    import triton

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("Triton before 3.4 keeps no tuning on disk")
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": path}
    first, again = (subprocess.run([sys.executable, "-c", _TUNE_ONCE, run], env=env, capture_output=True, text=True)
                    for run in ("first", "again"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(first.stdout.splitlines()) == 2 and "None" not in first.stdout
    assert again.stdout == first.stdout


_COMPILE_ON_THREADS = """
import threading, torch, triton.compiler
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.base import quantize_matrix
from lowbit.kernels import reference_w4a16_matmul, w4a16_triton as wt
from lowbit.kernels.int4_pack import pack_quantized_weight

weight = torch.randn(192, 512, generator=torch.Generator().manual_seed(9))
packed = pack_quantized_weight(quantize_matrix(IntegerFormat(4, symmetric=False, group_size=128), weight)).to("cuda")
on_main_thread = []
compile_one = triton.compiler.compile  # a JIT function takes it from there at its first launch
def recording(*args, **kwargs):
    on_main_thread.append(threading.current_thread() is threading.main_thread())
    return compile_one(*args, **kwargs)
triton.compiler.compile = recording
x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
expected = reference_w4a16_matmul(x.float(), packed)
error = ((wt.matmul(x, packed).float() - expected).norm() / expected.norm()).item()
print(len(on_main_thread), sum(on_main_thread), error)
"""


@gpu
@pytest.mark.parametrize("threads", ["", "1"])
def test_a_shapes_candidates_compile_on_worker_threads_before_timing(tmp_path, threads):
    """Timing would compile each candidate at its first launch, one after another; they are
    compiled on a thread pool first (LOWBIT_COMPILE_THREADS=1: on the caller's thread, as before)."""
    import triton

    if not hasattr(triton, "AsyncCompileMode"):
        pytest.skip("Triton before 3.5 compiles on the caller's thread only")
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": path, "LOWBIT_COMPILE_THREADS": threads}
    run = subprocess.run([sys.executable, "-c", _COMPILE_ON_THREADS], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    compiles, on_main_thread, error = run.stdout.split()
    assert int(compiles) > 1 and float(error) < 1e-2
    assert int(on_main_thread) == (int(compiles) if threads == "1" else 0)


@pytest.mark.parametrize("threads", ["3", "1"])
def test_the_autotuner_builds_every_candidate_before_timing_where_its_choice_is_not_on_disk(monkeypatch, threads):
    """The override's part, on CPU: Triton's disk check (replaced here: it needs a GPU) is told to
    time; before it does, every candidate is built with the launch's own arguments (warmup=True)."""
    pytest.importorskip("triton")
    import triton
    from triton.runtime.autotuner import Autotuner

    from lowbit.kernels.autotune import ParallelCompileAutotuner

    if not hasattr(triton, "AsyncCompileMode"):
        pytest.skip("Triton before 3.5 compiles on the caller's thread only")
    events = []

    class Kernel:
        arg_names = ["x", "N"]
        fn = staticmethod(lambda x, N: None)  # what the autotuner names the kernel by

        def run(self, *args, **kwargs):
            events.append(("build" if kwargs.get("warmup") else "launch", args, kwargs.get("BLOCK")))

    def timed_on_a_miss(self, tuning_key, configs, bench_fn):
        bench_fn()
        return False

    monkeypatch.setattr(Autotuner, "check_disk_cache", timed_on_a_miss)
    def timed(self, *args, config, **meta):
        events.append(("time", args, config.kwargs["BLOCK"]))
        return float(config.kwargs["BLOCK"])  # far apart: no finalists to time again

    monkeypatch.setattr(Autotuner, "_bench", timed)
    monkeypatch.setenv("LOWBIT_COMPILE_THREADS", threads)
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    tuner = ParallelCompileAutotuner(Kernel(), Kernel.arg_names, configs, ["N"], None, None,
                                     do_bench=lambda *a, **k: 1.0, cache_results=True)
    tuner.run("x", 7, grid=(1,), warmup=False)
    built = [(args, block) for kind, args, block in events if kind == "build"]
    assert built == ([] if threads == "1" else [(("x", 7), b) for b in (16, 32, 64)])
    assert [kind for kind, _, _ in events][len(built):] == ["time"] * 3 + ["launch"]


def test_the_autotuner_times_its_finalists_again_and_keeps_their_medians(monkeypatch):
    """One noisy timing must not choose: candidates within FINALIST_MARGIN of the fastest are timed
    REFINE_ROUNDS more times, in turns, and the choice (and what goes to disk) follows the medians."""
    pytest.importorskip("triton")
    import triton
    from triton.runtime.autotuner import Autotuner

    from lowbit.kernels import autotune

    if not hasattr(triton, "AsyncCompileMode"):
        pytest.skip("Triton before 3.5 uses triton.autotune as it is")
    first_round = {16: 1.00, 32: 1.05, 64: 1.10, 128: 2.0}  # 16 lucky once; 128 no finalist
    later_rounds = {16: [1.3, 1.2, 0.9, 1.3, 1.25], 32: [1.0] * 5, 64: [1.1] * 5}
    timed = []

    class Kernel:
        arg_names = ["x", "N"]
        fn = staticmethod(lambda x, N: None)

        def run(self, *args, **kwargs):
            pass

    def bench(self, *args, config, **meta):
        block = config.kwargs["BLOCK"]
        timed.append(block)
        rounds_before = timed.count(block) - 1
        return first_round[block] if rounds_before == 0 else later_rounds[block][rounds_before - 1]

    stored = {}

    def timed_on_a_miss(self, tuning_key, configs, bench_fn):
        bench_fn()
        stored.update(self.configs_timings)
        return False

    monkeypatch.setattr(Autotuner, "check_disk_cache", timed_on_a_miss)
    monkeypatch.setattr(Autotuner, "_bench", bench)
    monkeypatch.setenv("LOWBIT_COMPILE_THREADS", "1")
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128)]
    tuner = autotune.ParallelCompileAutotuner(Kernel(), Kernel.arg_names, configs, ["N"], None, None,
                                              do_bench=lambda *a, **k: 1.0, cache_results=True)
    tuner.run("x", 7, grid=(1,), warmup=False)
    assert timed[:4] == [16, 32, 64, 128]
    assert timed[4:] == [16, 32, 64] * autotune.REFINE_ROUNDS
    assert tuner.best_config.kwargs["BLOCK"] == 32
    assert {c.kwargs["BLOCK"]: t for c, t in stored.items()} == {16: 1.25, 32: 1.0, 64: 1.1, 128: 2.0}


def test_the_autotuner_tries_variants_on_its_finalists_only(monkeypatch):
    """Variants (here PIPELINE 2 beside each candidate's 3) are not in the first round: each
    finalist's variants that the prune keeps are compiled then and timed with the finalists, in
    turns; one of them may win, and its median goes to disk with the rest."""
    pytest.importorskip("triton")
    import triton
    from triton.runtime.autotuner import Autotuner

    from lowbit.kernels import autotune

    if not hasattr(triton, "AsyncCompileMode"):
        pytest.skip("Triton before 3.5 uses triton.autotune over every variant")
    first_round = {(16, 3): 1.0, (32, 3): 1.1, (64, 3): 1.12, (128, 3): 2.0}
    later_rounds = {(16, 3): 1.0, (32, 3): 1.1, (64, 3): 1.12, (16, 2): 1.2, (32, 2): 0.9}
    timed, built = [], []

    class Kernel:
        arg_names = ["x", "N"]
        fn = staticmethod(lambda x, N: None)

        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                built.append((kwargs["BLOCK"], kwargs["PIPELINE"]))

    def bench(self, *args, config, **meta):
        block = config.kwargs["BLOCK"], config.kwargs["PIPELINE"]
        timed.append(block)
        return first_round[block] if timed.count(block) == 1 and block in first_round else later_rounds[block]

    stored = {}

    def timed_on_a_miss(self, tuning_key, configs, bench_fn):
        bench_fn()
        stored.update(self.configs_timings)
        return False

    def prune(configs, named_args, **kwargs):  # the kernel cannot run BLOCK 64 at PIPELINE 2
        return [c for c in configs if (c.kwargs["BLOCK"], c.kwargs["PIPELINE"]) != (64, 2)]

    def deeper(config):
        return [triton.Config({**config.kwargs, "PIPELINE": 2})]

    monkeypatch.setattr(Autotuner, "check_disk_cache", timed_on_a_miss)
    monkeypatch.setattr(Autotuner, "_bench", bench)
    monkeypatch.setenv("LOWBIT_COMPILE_THREADS", "2")
    configs = [triton.Config({"BLOCK": b, "PIPELINE": 3}) for b in (16, 32, 64, 128)]
    tuner = autotune.ParallelCompileAutotuner(Kernel(), Kernel.arg_names, configs, ["N"], None, None,
                                              prune_configs_by={"early_config_prune": prune},
                                              do_bench=lambda *a, **k: 1.0, cache_results=True)
    tuner.finalist_variants = deeper
    tuner.run("x", 7, grid=(1,), warmup=False)
    assert timed[:4] == [(16, 3), (32, 3), (64, 3), (128, 3)]
    assert built[4:] == [(16, 2), (32, 2)]  # after the four candidates: the finalists' variants
    assert timed[4:] == [(16, 3), (32, 3), (64, 3), (16, 2), (32, 2)] * autotune.REFINE_ROUNDS
    assert (tuner.best_config.kwargs["BLOCK"], tuner.best_config.kwargs["PIPELINE"]) == (32, 2)
    assert {(c.kwargs["BLOCK"], c.kwargs["PIPELINE"]): t for c, t in stored.items()} == {**later_rounds, (128, 3): 2.0}
    assert len(autotune.every_candidate(tuner)) == 8


def test_compile_threads_refuses_a_count_that_is_not_a_whole_number(monkeypatch):
    pytest.importorskip("triton")
    from lowbit.kernels.autotune import compile_threads

    monkeypatch.setenv("LOWBIT_COMPILE_THREADS", "4")
    assert compile_threads() == 4
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("LOWBIT_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="LOWBIT_COMPILE_THREADS"):
            compile_threads()


@gpu
@pytest.mark.parametrize("m, block_m, block_n, block_k, unpack", [(1, 1, 512, 32, "f16"), (1, 1, 64, 128, "biased"),
                                                                  (16, 16, 64, 128, "paired")])
def test_a_split_count_that_is_no_power_of_two_matches_the_reference(m, block_m, block_n, block_k, unpack):
    """What _prune makes of a split that does not divide K's groups (three groups, split 3)."""
    _check_one_launch(m, 384, block_m, block_n, block_k, 3, False, symmetric=False, seed=70 + m,
                      biased=unpack == "biased", paired=unpack == "paired", f16=unpack == "f16")


def test_split_counts_that_do_not_divide_k_become_the_nearest_that_do():
    """Split-K spans whole groups: at 112 groups (K = 14336) split 32 becomes 28, at 148 (K = 18944)
    it becomes 37 and 8 and 16 fall back to 4; every kept config divides K's groups."""
    pytest.importorskip("triton")
    from lowbit.kernels import w4a16_triton as wt

    def splits(k: int) -> list[int]:
        kept = wt._prune(wt._GEMV_CONFIGS, {"M_BUCKET": 1, "N": 4096, "K": k, "GROUP": 128})
        assert all((k // 128) % config.kwargs["SPLIT_K"] == 0 for config in kept)
        assert all(config.kwargs["SPLIT"] == (config.kwargs["SPLIT_K"] > 1) for config in kept)
        return sorted({config.kwargs["SPLIT_K"] for config in kept})

    assert splits(4096) == [1, 2, 4, 8, 16, 32]
    assert splits(14336) == [1, 2, 4, 8, 16, 28]
    assert splits(18944) == [1, 2, 4, 37]


def test_kernels_in_the_interpreter():
    """The M > 1 kernel (reshaped tile and PAIRED_DOTS in bf16 and fp16, plain and swapped) and the GEMV (both
    unpacks, with and without split-K, K tiles smaller than the group) on CPU through
    TRITON_INTERPRET=1 (in a subprocess: the flag is read at import)."""
    pytest.importorskip("triton")
    script = (
        # Triton 3.6's interpreter turns a loop bound computed from run-time arguments into a
        # one-element array, which NumPy 2.4 no longer converts to an int: it cannot run these
        # kernels there (Triton 3.9's can), so the test is skipped with the versions named.
        "import numpy, torch, triton, triton.language as tl\n"
        "@triton.jit\n"
        "def loop_bound_probe(out_ptr, n, split):\n"
        "    total = 0\n"
        "    for i in range(0, n // split):\n"
        "        total += 1\n"
        "    tl.store(out_ptr, total)\n"
        "try:\n"
        "    loop_bound_probe[(1,)](torch.zeros(1, dtype=torch.int32), 6, 2)\n"
        "except Exception as error:\n"
        "    print(f'SKIP Triton {triton.__version__} interpreter with NumPy {numpy.__version__}: {error}')\n"
        "    raise SystemExit(0)\n"
        "from tests.test_kernels import _run_config, quantized\n"
        "from lowbit.formats.integer import IntegerFormat\n"
        "from lowbit.kernels import w4a16_triton as wt\n"
        "from lowbit.kernels.int4_pack import pack_quantized_weight\n"
        "for symmetric in (True, False):\n"
        "    qweight = quantized(48, 256, IntegerFormat(4, symmetric=symmetric, group_size=128), seed=3)\n"
        "    packed = pack_quantized_weight(qweight)\n"
        "    x = torch.randn(5, 256)\n"
        "    ref = x @ qweight.dequantize().T\n"
        "    for swap in (False, True):\n"
        "        out = torch.full((5, 48), float('nan'))\n"
        "        _run_config(wt._mma_kernel, x, packed, 16, 16, 128, 1, swap, out)\n"
        "        assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3), (swap, (out - ref).abs().max())\n"
        # PAIRED_DOTS unpacks into x's 16-bit type. The interpreter gets bf16 arithmetic and loads
        # wrong (the reshaped tile fails the same way), so the whole kernel runs in fp16 here; the
        # bf16 unpack is checked value by value below, the rest on the GPU and in the sm_90 compiles.
        "        x16 = x.half()\n"
        "        exact = x16.double() @ qweight.dequantize().double().T\n"
        "        out = torch.full((5, 48), float('nan'), dtype=torch.float16)\n"
        "        _run_config(wt._mma_kernel, x16, packed, 16, 16, 128, 1, swap, out, paired=True)\n"
        "        error = float((out.double() - exact).norm() / exact.norm())\n"
        "        assert error < 4e-3, (swap, error)  # the output's own rounding\n"
        "    for biased in (False, True):\n"
        "        for block_n, block_k, split in ((16, 32, 1), (32, 64, 2), (128, 32, 2)):  # rows across threads, within\n"
        "            out = torch.full((1, 48), float('nan'))\n"
        "            _run_config(wt._gemv_kernel, x[:1], packed, 1, block_n, block_k, split, False, out, biased)\n"
        "            error = float((out - ref[:1]).norm() / ref[:1].norm())\n"
        "            # The biased unpack's sums carry up to 2^11 x the codes (see int4_unpack.biased_code): 1e-4 here,\n"
        "            # well below the 2^-9 a bf16 output is rounded to; the plain unpack is exact up to float32.\n"
        "            assert error < (5e-4 if biased else 1e-5), (biased, split, error)\n"
        # A split count that is no power of two (what _prune makes of one that does not divide K).
        "qweight = quantized(48, 384, IntegerFormat(4, symmetric=False, group_size=128), seed=4)\n"
        "packed, x = pack_quantized_weight(qweight), torch.randn(5, 384)\n"
        "ref = x @ qweight.dequantize().T\n"
        "out = torch.full((1, 48), float('nan'))\n"
        "_run_config(wt._gemv_kernel, x[:1], packed, 1, 16, 32, 3, False, out)\n"
        "assert float((out - ref[:1]).norm() / ref[:1].norm()) < 1e-5\n"
        "out = torch.full((5, 48), float('nan'))\n"
        "_run_config(wt._mma_kernel, x, packed, 16, 16, 128, 3, False, out)\n"
        "assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3), (out - ref).abs().max()\n"
        "import triton.language as tl\n"
        "from tests.triton_probes import paired_codes_probe\n"
        "codes = torch.randint(0, 16, (64, 8))\n"
        "words = sum(codes[:, j].long() << (4 * j) for j in range(8))\n"
        "words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)\n"
        "for dtype, base in ((tl.bfloat16, 128), (tl.float16, 1024)):\n"
        "    for j in range(4):\n"
        "        out = torch.empty(2, 64)\n"
        "        paired_codes_probe[(1,)](words, out, N=64, J=j, DTYPE=dtype)\n"
        "        assert torch.equal(out, base + codes[:, [j, j + 4]].T.float()), (dtype, j)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    if result.stdout.startswith("SKIP "):
        pytest.skip(result.stdout.strip().removeprefix("SKIP "))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@gpu
@pytest.mark.parametrize("group_size, symmetric", [(128, False), (64, True), (32, False)])
def test_dequantize_then_cublas_path_matches_the_reference(group_size, symmetric):
    from lowbit.kernels import w4a16_triton as wt

    qweight = quantized(320, 1024, IntegerFormat(4, symmetric=symmetric, group_size=group_size), seed=5)
    packed = pack_quantized_weight(qweight).to("cuda")
    assert torch.equal(wt.dequantize_transposed(packed, torch.float32).T.cpu(), qweight.dequantize())
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qweight.dequantize().double().cuda().T
    assert relative_error(wt.dequantize_matmul(x, packed), ref) < 1e-2


@gpu
def test_large_m_records_a_measured_path_choice():
    from lowbit.kernels.w4a16 import path_table

    qweight = quantized(256, 512, IntegerFormat(4, symmetric=False, group_size=128), seed=6)
    packed = pack_quantized_weight(qweight).to("cuda")
    x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
    out = w4a16_matmul(x, packed)
    assert relative_error(out, x.double() @ qweight.dequantize().double().cuda().T) < 1e-2
    chosen = [path for key, path in path_table().items() if key[2:5] == (256, 256, 512)]
    assert chosen and chosen[0] in PATHS


def test_every_row_of_the_kernel_table_fills_each_column_of_its_header():
    """A row missing a cell shifts every later value under the wrong path's name. The gluon column
    holds the Gluon GEMV at M = 1."""
    from lowbit.bench.kernels import markdown_table

    meta = {"group_size": 128, "device": "GPU", "torch": "t", "triton": "t", "copy_bandwidth_GBps": 4000.0}
    row = {"shape": "8B q/o_proj", "N": 4096, "K": 4096, "M": 16, "bf16_us": 13.0, "lowbit_sym_us": 8.0,
           "lowbit_asym_us": 8.5, "fused_asym_us": 9.9, "gluon_asym_us": 8.5, "fbgemm_asym_us": 15.5,
           "roofline_us": 2.1, "rel_err_lowbit_asym": 1.7e-3, "path_asym": "gluon", "config_asym": "16x64 span 512"}

    def columns(row: dict) -> dict[str, str]:
        table = [line for line in markdown_table({"meta": meta, "rows": [row]}).splitlines() if line.startswith("|")]
        header, rule, cells = ([c.strip() for c in line.strip("|").split("|")] for line in table)
        assert len(header) == len(rule) == len(cells)
        return dict(zip(header, cells))

    assert columns(row)["gluon asym"] == "8.5" and columns(row)["fbgemm asym"] == "15.5"
    gemv_row = {key: value for key, value in row.items() if key != "gluon_asym_us"}
    gemv_row.update({"M": 1, "gluon-gemv_asym_us": 6.4, "path_asym": "gluon-gemv"})
    assert columns(gemv_row)["gluon asym"] == "6.4"


def test_weight_copies_keep_one_copy_per_variant_until_the_weight_is_written():
    from lowbit.kernels.weight_copies import WeightCopies

    copies = WeightCopies()
    packed = pack_quantized_weight(quantized(64, 256, IntegerFormat(4, symmetric=False, group_size=128), seed=1))
    builds = []

    def build(tag):
        builds.append(tag)
        return f"{tag} #{len(builds)}"

    assert copies.get(packed, lambda: build("bf16"), variant=torch.bfloat16) == "bf16 #1"
    assert copies.get(packed, lambda: build("fp16"), variant=torch.float16) == "fp16 #2"
    assert copies.get(packed, lambda: build("bf16"), variant=torch.bfloat16) == "bf16 #1"  # kept, not rebuilt
    packed.qweight.add_(0)  # an in-place write, as load_state_dict's copy_
    assert copies.get(packed, lambda: build("bf16"), variant=torch.bfloat16) == "bf16 #3"
    assert packed.qweight in copies
    copies.release(packed, variant=torch.float16)  # the other dtype's copy stays
    assert copies.get(packed, lambda: build("bf16"), variant=torch.bfloat16) == "bf16 #3"
    copies.release(packed, variant=torch.bfloat16)
    assert packed.qweight not in copies  # its last variant gone
    copies.get(packed, lambda: build("fp16"), variant=torch.float16)
    copies.get(packed, lambda: build("bf16"), variant=torch.bfloat16)
    copies.release(packed)
    assert packed.qweight not in copies


def test_the_warmup_breakdown_counts_each_timed_call_without_its_nested_ones(monkeypatch):
    """gpu_warmup_breakdown.py: a dispatcher choice that nests a compile and two timings keeps only
    its own seconds; each phase gets its calls and what it took alone."""
    pytest.importorskip("triton")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_warmup_breakdown")
    clock = iter([0.0, 1.0, 4.0, 5.0, 5.5, 6.0, 6.25, 10.0])  # starts and ends, in call order
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(clock))
    compile_ = script._timed(lambda: ("compile", "k"), lambda: None)
    time_ = script._timed(lambda: ("time", "k"), lambda: None)

    def choose():
        compile_()  # 1 -> 4
        time_()  # 5 -> 5.5
        time_()  # 6 -> 6.25

    script._timed(lambda: ("choose", "M 16"), choose)()  # 0 -> 10
    assert dict(script._seconds) == {("compile", "k"): 3.0, ("time", "k"): 0.75, ("choose", "M 16"): 6.25}
    assert dict(script._calls) == {("compile", "k"): 1, ("time", "k"): 2, ("choose", "M 16"): 1}
