"""The Gluon W4A16 kernel for 2 <= M <= 32 (kernels/w4a16_gluon.py): its word shuffle, its layout
cache, the dispatcher's release of copies it did not choose, and its sm_90 compile on the installed
Triton (no GPU needed); on an sm_90 GPU, its product against float64 dequantize-then-matmul."""

from __future__ import annotations

import re

import pytest
import torch

from lowbit.formats.integer import IntegerFormat
from lowbit.kernels import w4a16, w4a16_gluon
from lowbit.kernels.int4_pack import pack_quantized_weight
from tests.test_kernels import (check_dispatcher_allowing, check_layout_follows_in_place_weight_changes, quantized,
                                relative_error)

needs_gluon_gpu = pytest.mark.skipif(not w4a16_gluon.available(),
                                     reason=f"needs an sm_90 GPU and Triton with Gluon ({w4a16_gluon.import_error()})")


def pinned_config_error(module, config: str, m: int, n: int, k: int, symmetric: bool, seed: int) -> float:
    """Relative error against float64 of `module`'s matmul (a Gluon path) run with `config` pinned,
    on an int4 g128 weight [n, k] and m random bf16 rows: a pinned config runs untimed."""
    weight = quantized(n, k, IntegerFormat(4, symmetric=symmetric, group_size=128), seed=seed)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    with module.pinned_config(config):
        out = module.matmul(x, packed)
    return relative_error(out, x.double() @ weight.dequantize().double().cuda().T)


@pytest.mark.parametrize("group", w4a16_gluon.GROUPS)
def test_each_word_holds_the_codes_of_one_threads_operand_registers(group):
    """Word (g, nb, ni, t, c), nibble 4h + 2·j1 + j0: column 8·nb + ni, K = G·g + 32c + 16·j1 + 8·j0 + 2t + h,
    the (k, k + 1) pair of register 2·j1 + j0 of the quad's thread t in mma.m16n8k16's B operand."""
    n, k = 16, 2 * group
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    chunks = group // 32
    words = w4a16_gluon.shuffle_words(codes, group).reshape(k // group, n // 8, 8, 4, chunks).long() & 0xFFFFFFFF
    for g, nb, ni, t, c, h, j1, j0 in torch.cartesian_prod(
            *(torch.arange(s) for s in (k // group, n // 8, 8, 4, chunks, 2, 2, 2))).tolist():
        nibble = (int(words[g, nb, ni, t, c]) >> (4 * (4 * h + 2 * j1 + j0))) & 0xF
        assert nibble == int(codes[8 * nb + ni, group * g + 32 * c + 16 * j1 + 8 * j0 + 2 * t + h])


def test_the_shuffled_copy_is_kept_rebuilt_after_an_in_place_write_and_released():
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    packed = pack_quantized_weight(quantized(64, 256, fmt, seed=1))
    first = w4a16_gluon.layout(packed)
    assert w4a16_gluon.layout(packed) is first
    packed.qweight.copy_(pack_quantized_weight(quantized(64, 256, fmt, seed=2)).qweight)
    rebuilt = w4a16_gluon.layout(packed)
    assert rebuilt is not first and not torch.equal(rebuilt, first)
    w4a16_gluon.release(packed)
    assert packed.qweight not in w4a16_gluon._LAYOUTS


def test_the_dispatcher_drops_a_copy_only_when_no_bucket_of_the_shape_chose_its_path(monkeypatch):
    """Timing builds every candidate's copy of the timed weight; the ones no M bucket of the shape
    uses are dropped, so an installed library does not double each weight's memory."""
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    packed = pack_quantized_weight(quantized(64, 256, fmt, seed=1))
    shape = (64, 256, 128, False)
    monkeypatch.setattr(w4a16, "_CHOSEN", {(0, torch.bfloat16, 16, *shape): "fused"})
    w4a16_gluon.layout(packed)
    w4a16._release_unchosen_copies((0, torch.bfloat16, 16, *shape), {"fused": None, "gluon": None}, packed)
    assert packed.qweight not in w4a16_gluon._LAYOUTS
    w4a16._CHOSEN[(0, torch.bfloat16, 64, *shape)] = "gluon"  # (as if another bucket had chosen it)
    w4a16_gluon.layout(packed)
    w4a16._release_unchosen_copies((0, torch.bfloat16, 16, *shape), {"fused": None, "gluon": None}, packed)
    assert packed.qweight in w4a16_gluon._LAYOUTS


def test_the_dispatcher_drops_an_unchosen_gemlite_copy_of_the_timed_dtype_only(monkeypatch):
    """GemLite keeps a copy per activation dtype: timing at fp16 drops the fp16 copy when no
    bucket chose GemLite at fp16, and leaves the bf16 copy that bf16's choice uses."""
    from lowbit.kernels import w4a16_gemlite

    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    packed = pack_quantized_weight(quantized(64, 256, fmt, seed=1))
    shape = (64, 256, 128, False)
    monkeypatch.setattr(w4a16, "_CHOSEN", {(0, torch.bfloat16, 16, *shape): "gemlite",
                                           (0, torch.float16, 16, *shape): "fused"})
    monkeypatch.setattr(w4a16_gemlite, "_build", lambda packed, dtype: f"module for {dtype}")
    for dtype in (torch.bfloat16, torch.float16):
        w4a16_gemlite.layout(packed, dtype)
    w4a16._release_unchosen_copies((0, torch.float16, 16, *shape), {"fused": None, "gemlite": None}, packed)
    assert w4a16_gemlite._LAYOUTS._held[packed.qweight].keys() == {torch.bfloat16}
    w4a16._release_unchosen_copies((0, torch.bfloat16, 16, *shape), {"fused": None, "gemlite": None}, packed)
    assert packed.qweight in w4a16_gemlite._LAYOUTS  # bf16 chose it


def test_it_is_offered_only_for_what_it_computes():
    fmt = IntegerFormat(4, symmetric=True, group_size=128)
    packed = pack_quantized_weight(quantized(64, 256, fmt, seed=1))
    assert not w4a16_gluon.supports(packed, torch.bfloat16)  # on the CPU
    with pytest.raises(ValueError, match="at most 64 rows"):
        w4a16_gluon.matmul(torch.zeros(65, 256, dtype=torch.bfloat16), packed)


def test_m_above_16_gets_32_row_tiles_and_buckets_of_its_own():
    """The tile doubles its rows past 16, and past 32 two tiles run side by side; the dispatcher
    and the tuners key 17..32 apart from 33..64."""
    assert [tuple(w4a16_gluon.tile_shape(m).values()) for m in (2, 16, 17, 32, 33, 64)] == [
        (16, 1), (16, 1), (32, 1), (32, 1), (32, 2), (32, 2)]
    assert [w4a16.bucket(m) for m in (1, 2, 16, 17, 32, 33, 64, 65, 200)] == [1, 16, 16, 32, 32, 64, 64, 128, 256]


def _ptx(block_n: int, k_span: int, group: int = 128, symmetric: bool = False, warps: int = 4,
         block_m: int = 16, row_blocks: int = 1) -> str:
    pytest.importorskip("triton.experimental.gluon")
    from lowbit.kernels.w4a16_gluon_kernel import compile_for_sm90

    return compile_for_sm90(block_n, k_span, group, symmetric, warps, block_m=block_m,
                            row_blocks=row_blocks).asm["ptx"]


@pytest.mark.parametrize("block_n, k_span, group, symmetric, warps, block_m, row_blocks",
                         [(64, 1024, 128, False, 4, 16, 1), (256, 1024, 128, False, 4, 16, 1),
                          (64, 512, 128, True, 4, 16, 1), (64, 256, 64, False, 4, 16, 1),
                          (128, 256, 32, False, 4, 16, 1), (64, 512, 256, False, 4, 16, 1),
                          (64, 1024, 128, False, 8, 16, 1), (256, 512, 128, True, 8, 16, 1),
                          (128, 1024, 128, False, 8, 32, 1), (64, 512, 128, True, 4, 32, 1),
                          (128, 256, 32, False, 4, 32, 1), (128, 1024, 128, False, 8, 32, 2)])
def test_the_kernel_compiles_for_hopper_with_its_operands_in_place(block_n, k_span, group, symmetric, warps,
                                                                   block_m, row_blocks):
    """The compile asserts the unpacked words need no conversion to the MMA operand's layout.
    Symmetric codes are unpacked with a subtraction; folded asymmetric ones keep their bias (the
    row-sum correction takes it off), so their unpack has none."""
    ptx = _ptx(block_n, k_span, group, symmetric, warps, block_m, row_blocks)
    # One group per loop step: group / 16 k16 steps x BLOCK_N / 8 n8 tiles over the warps, each
    # unpacked fragment feeding BLOCK_M / 16 MMAs.
    assert ptx.count("mma.sync.aligned.m16n8k16") == group // 16 * block_n // 8 // warps * block_m // 16
    assert ("sub.rn.bf16x2" in ptx) == symmetric
    assert "lop3.b32" in ptx


def test_a_threads_words_of_a_group_arrive_in_16_byte_loads():
    """With a group's chunks side by side, each 32 columns of a thread's words are one 16-byte load
    (an ncu profile found the kernel latency-bound, and 4-byte loads held 96 registers, not 79).
    Three groups' loads are in the code: two before the loop, one in it."""
    vector_loads = {bn: len(re.findall(r"ld\.global[.\w]*\.v4\.b32", _ptx(bn, 1024))) for bn in (64, 128)}
    assert vector_loads[128] - vector_loads[64] == 3 * (128 - 64) // 32


@needs_gluon_gpu
@pytest.mark.parametrize("m, group, symmetric", [(2, 128, False), (5, 128, True), (16, 128, False), (16, 64, True),
                                                 (9, 32, False), (16, 256, False), (17, 128, False), (24, 128, True),
                                                 (32, 32, False), (32, 256, True), (33, 128, False),
                                                 (48, 64, True), (64, 128, False)])
@pytest.mark.parametrize("n, k", [(384, 1024), (1024, 4096)])
def test_gluon_matches_float64_dequantize_then_matmul(m, group, symmetric, n, k):
    fmt = IntegerFormat(4, symmetric=symmetric, group_size=group)
    weight = quantized(n, k, fmt, seed=m)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ weight.dequantize().double().cuda().T
    for _ in range(2):  # the second call finds the workspace the first split-K call reset
        assert relative_error(w4a16_gluon.matmul(x, packed), ref) < 1e-2


@needs_gluon_gpu
@pytest.mark.parametrize("config, k", [("16x64 span 256 w4", 512), ("16x64 span 256 w4 unpacked zeros", 768),
                                       ("16x128 span 1024 w4 ahead 1", 2048), ("16x64 span 256 w8 ahead 1", 1280),
                                       ("32x64 span 256 w4 unpacked zeros", 768), ("32x128 span 512 w8 ahead 1", 1024),
                                       ("2x32x128 span 256 w4", 512)])
def test_gluon_asymmetric_weights_match_with_zero_points_folded_and_unpacked(config, k):
    """The tuner may choose either way of the zero points per shape, and one group's words in
    flight or two: each must be right (a pinned config runs untimed), at either tile's rows."""
    m = {"16": 7, "32": 29, "2x32": 53}[config.split(" ")[0].rpartition("x")[0]]
    assert pinned_config_error(w4a16_gluon, config, m, 256, k, symmetric=False, seed=k) < 1e-2


@needs_gluon_gpu
def test_gluon_folded_codes_stay_accurate_when_x_has_a_large_common_offset():
    """Folded codes carry their bias 128 into the MMA and the row-sum correction cancels 128·Σx:
    the worst case is x whose group sums are large against the result (a common offset, an
    outlier channel), as hidden states can be."""
    weight = quantized(256, 1024, IntegerFormat(4, symmetric=False, group_size=128), seed=11)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(16, 1024, device="cuda") + 50.0
    x[:, 7] = 3000.0
    x = x.to(torch.bfloat16)
    with w4a16_gluon.pinned_config("16x64 span 256 w4"):
        out = w4a16_gluon.matmul(x, packed)
    assert relative_error(out, x.double() @ weight.dequantize().double().cuda().T) < 1e-2


@needs_gluon_gpu
def test_gluon_layout_follows_in_place_weight_changes():
    check_layout_follows_in_place_weight_changes(w4a16_gluon.matmul)


@needs_gluon_gpu
def test_dispatcher_with_gluon_allowed_handles_act_order_and_records_its_choice():
    check_dispatcher_allowing("gluon", 384)


@needs_gluon_gpu
def test_gluon_replayed_from_a_cuda_graph_follows_its_input():
    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    weight = quantized(1024, 4096, fmt, seed=4)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w4a16_gluon.matmul(x, packed)  # tuned and its layout built outside the capture, as the dispatcher's warm-up does
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_gluon.matmul(x, packed)
    exact = weight.dequantize().double().cuda()
    for seed in range(2):
        x.copy_(torch.randn(16, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, x.double() @ exact.T) < 1e-2


def test_the_profiler_script_takes_a_gluon_config_or_says_how_to_write_one():
    pytest.importorskip("triton")  # the script imports the Triton kernels
    from tests.conftest import benchmark_script

    gpu_profile = benchmark_script("gpu_profile")
    assert gpu_profile.parse_case("70B gate/up_proj:16@16x128 span 1024 w8") == ("70B gate/up_proj", 16, False,
                                                                              "16x128 span 1024 w8")
    assert [gpu_profile.kernel_of(c) for c in ("16x128 span 1024 w8", "1x256x32 span 256 w4 ahead 1",
                                               "1x512x32 split 16 f16 pipeline 3")] == ["gluon", "gluon-gemv", "fused"]
    for wrong in ("70B gate/up_proj", "70B up:16@16x64 span 512"):
        with pytest.raises(SystemExit, match="give SHAPE:M"):
            gpu_profile.parse_case(wrong)
    with pytest.raises(ValueError, match="no config is named .*16x64 split 8.*write a Gluon W4A16 config"):
        pytest.importorskip("triton.experimental.gluon")
        with w4a16_gluon.pinned_config("16x64 split 8"):
            pass


def test_the_profiler_can_pin_every_config_the_saved_kernel_table_chose():
    """gpu_profile.py's default cases profile the saved table's choices, Gluon kernels' among them:
    each config it recorded must name a candidate of the kernel its name says."""
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    gpu_profile = benchmark_script("gpu_profile")
    chosen = gpu_profile.chosen_configs(gpu_profile.BENCH)
    assert {gpu_profile.kernel_of(config) for config in chosen.values()} == {"fused", "gluon", "gluon-gemv"}
    for (name, m, symmetric), config in chosen.items():
        pinned, matmul = gpu_profile.pinned_matmul(m, config)
        with pinned:
            assert matmul.__module__.endswith({"fused": "triton", "gluon": "gluon", "gluon-gemv": "gluon_gemv"}
                                              [gpu_profile.kernel_of(config)])


def test_the_tuner_is_offered_only_tiles_that_fit_the_shape():
    """Whole column tiles, spans of whole groups dividing K, at most 32 words a thread, at most
    4096 programs; 8-warp tiles halve a thread's words, so they may be wider. Every candidate may
    have its asymmetric zero points unpacked instead of folded, or one group's words in flight
    instead of two (variants the tuner tries on its finalists); symmetric weights have no zero
    points, so their unpacked variant is pruned."""
    pytest.importorskip("triton.experimental.gluon")
    from lowbit.kernels.autotune import every_candidate

    configs = every_candidate(w4a16_gluon._tuned())
    assert not any("unpacked zeros" in w4a16_gluon._describe(c) or "ahead" in w4a16_gluon._describe(c)
                   for c in w4a16_gluon._tuned().configs)
    assert "16x128 span 1024 w4 ahead 1" in {w4a16_gluon._describe(c) for c in configs}

    def described(n: int, k: int, group: int = 128, symmetric: bool = True) -> set[str]:
        kept = w4a16_gluon._prune(configs, {"N": n, "K": k}, GROUP=group, SYMMETRIC=symmetric)
        return {w4a16_gluon._describe(c) for c in kept}

    small = described(1024, 4096)
    assert {"16x64 span 128 w4", "16x256 span 2048 w8", "16x256 span 1024 w4", "16x64 span 128 w4 ahead 1"} <= small
    assert not any("unpacked zeros" in name for name in small)
    assert described(1024, 4096, symmetric=False) == small | {f"{name} unpacked zeros" for name in small
                                                              if "ahead" not in name}
    wide_groups = described(1024, 4096, group=256)
    assert "16x256 span 1024 w4" not in wide_groups and "16x256 span 1024 w8" in wide_groups  # 64 words vs 32
    assert not any(" span 128 " in name for name in wide_groups)  # a span must hold a whole group
    odd = described(384, 4096)
    assert odd and all(name.startswith(("16x64 ", "16x128 ")) for name in odd)  # 384 = 3 x 128
    assert "16x64 span 128 w4" not in described(28672, 8192)  # 448 x 64 programs


def test_the_zero_fold_benchmark_sets_each_mode_beside_unpacked_zeros():
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_gluon_zero_fold")
    rows = [{"shape": "70B down_proj", "mode": mode, "us": us, "config": "16x128 span 1024 w4", "error": 1.7e-3}
            for mode, us in (("unpacked zeros", 60.0), ("folded zeros", 57.0), ("symmetric", 54.0))]
    table = script.markdown(rows, "GPU")
    assert "| 70B down_proj | folded zeros | 57.0 | 16x128 span 1024 w4 | 1.7e-03 | 0.95 |" in table
    assert set(script.WEIGHT_MODES) == {row["mode"] for row in rows}


def test_an_optional_path_that_fails_on_a_shape_is_left_out_with_a_warning(monkeypatch):
    """A Triton whose Gluon cannot build the kernel must not stop the product: the dispatcher
    warns in one line and chooses among the paths that ran."""
    from lowbit.kernels import timing

    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    packed = pack_quantized_weight(quantized(64, 256, fmt, seed=1))
    x = torch.zeros(4, 256)

    def fails():
        raise RuntimeError("out of resource: shared memory\nlong compiler log")

    monkeypatch.setattr(w4a16, "_CHOSEN", {})
    monkeypatch.setattr(w4a16, "_candidates", lambda x, packed: {"fused": lambda: "fused ran", "gluon": fails})
    monkeypatch.setattr(timing, "graph_time_ms", lambda call, device=None: (call(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build has no CUDA)
    with pytest.warns(UserWarning, match=r"path 'gluon' failed on a 64x256 weight .*RuntimeError: out of resource: "
                                         r"shared memory$"):
        path, call = w4a16._choose(x, packed)
    assert path == "fused" and call() == "fused ran"


def test_the_path_chosen_for_a_shape_and_bucket_is_what_reports_read(monkeypatch):
    """`chosen_path` reads the choice `_choose` stored, for the same shape, M bucket and dtype only."""
    from lowbit.kernels import timing

    fmt = IntegerFormat(4, symmetric=False, group_size=128)
    packed = pack_quantized_weight(quantized(64, 256, fmt, seed=1))

    def fused():
        return "fused ran"

    def gluon():
        return "gluon ran"

    monkeypatch.setattr(w4a16, "_CHOSEN", {})
    monkeypatch.setattr(w4a16, "_candidates", lambda x, packed: {"fused": fused, "gluon": gluon})
    monkeypatch.setattr(timing, "graph_time_ms", lambda call, device=None: {fused: 2.0, gluon: 1.0}[call])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build has no CUDA)
    assert w4a16.chosen_path(torch.zeros(4, 256), packed) == "fused"  # nothing timed yet
    assert w4a16._choose(torch.zeros(4, 256), packed)[0] == "gluon"
    assert w4a16.chosen_path(torch.zeros(9, 256), packed) == "gluon"  # 9 rows: the same 16-row bucket
    assert w4a16.chosen_path(torch.zeros(1, 256), packed) == "fused"  # another bucket
    assert w4a16.chosen_path(torch.zeros(4, 256, dtype=torch.bfloat16), packed) == "fused"  # another dtype


@pytest.mark.parametrize("config, mt, symmetric, scaled_a", [((64, 4, 512), 64, False, False), ((64, 4, 512), 64, False, True),
                                                              ((256, 8, 1024), 16, True, False)])
def test_the_swap_ab_experiment_compiles_its_weights_into_wgmmas_a_registers(config, mt, symmetric, scaled_a):
    """The word layout must be wgmma's A-operand register layout exactly (the conversion is
    asserted trivial while compiling), and each group must be one chain of wgmmas from registers."""
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    ptx = benchmark_script("gpu_wgmma_swap_ab").compile_for_sm90(config, mt, symmetric, scaled_a).asm["ptx"]
    assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{mt}k16\.f32\.bf16\.bf16 .*\{{", ptx)
    assert ("mul.rn.bf16x2" in ptx) == scaled_a


def test_the_swap_ab_experiment_can_run_its_wgmmas_from_shared_memory_one_group_in_flight():
    """The scaled weights stored (stmatrix) to a double buffer, the MMAs read both operands by
    descriptor, and the loop waits only for all but the newest group's MMAs."""
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_wgmma_swap_ab")
    ptx = script.compile_for_sm90((64, 4, 512), 64, False, True, a_shared=True).asm["ptx"]
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n64k16\.f32\.bf16\.bf16 \{[^}]*\}, %rd\d+, %rd\d+", ptx)
    assert "stmatrix" in ptx and "wgmma.wait_group.sync.aligned 1;" in ptx
    assert (64, 4, 1024) in script.configs(8192, 8192, 16, a_shared=True)
    assert (256, 8, 512) not in script.configs(8192, 8192, 64, a_shared=True)  # 64 KB of x and 128 KB of weights


def test_the_swap_ab_experiment_offers_configs_that_fit_and_reports_the_better_mode():
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_wgmma_swap_ab")
    assert [script.token_tile(m) for m in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    offered = script.configs(28672, 8192, 64)
    assert (128, 4, 512) in offered and (64, 8, 512) not in offered  # a warp needs 16 rows
    assert all(2 * 64 * span <= script.MAX_SHARED for _, _, span in offered)
    row = {"shape": "70B down_proj", "m": 64, "bf16": 120.0, "dispatcher": 106.0, "dispatcher path": "fbgemm",
           "exact": 160.0, "exact config": "128x64 span 512 w4", "exact error": 1.7e-3, "scaled A": 150.0,
           "scaled A config": "128x64 span 1024 w8", "scaled A error": 2.7e-3}
    table = script.markdown([row], "GPU")
    assert "| bf16 cuBLAS | dispatcher (path) | exact | scaled A | error (exact / scaled A) |" in table
    assert ("| 70B down_proj | 64 | 120.0 | 106.0 (fbgemm) | 160.0 (128x64 span 512 w4) | 150.0 (128x64 span 1024 w8) "
            "| 1.7e-03 / 2.7e-03 | 0.80x |") in table



def test_the_gluon_gemv_compiles_for_hopper_with_no_barrier_in_its_loop():
    """Each thread multiplies only the words it loaded itself, so the loop over groups needs no
    barrier (the Triton GEMV's pipelined loop has two a tile); x is staged once before it."""
    pytest.importorskip("triton.experimental.gluon")
    from lowbit.kernels.w4a16_gluon_kernel import compile_gemv_for_sm90
    from tests.conftest import benchmark_script

    gemv_sass = benchmark_script("gemv_sass")
    for block_n, k_span, block_k, symmetric, warps, ahead in ((512, 1024, 32, False, 4, 2), (256, 512, 64, True, 8, 1)):
        sass, registers, shared = gemv_sass.disassemble(compile_gemv_for_sm90(block_n, k_span, block_k,
                                                                              symmetric=symmetric, warps=warps,
                                                                              ahead=ahead))
        start, end, loop = gemv_sass.loop_opcodes(sass)[-1]
        assert loop["HFMA2"] and loop["LOP3"] and not loop["BAR"], loop
        assert registers <= 168


def test_a_pinned_config_that_does_not_fit_the_shape_is_refused_before_it_launches():
    """Triton launches a lone candidate without pruning it: a 128-column tile over 192 columns
    would leave a third of the output unwritten, and a span of 1024 over K = 512 read past it."""
    pytest.importorskip("triton.experimental.gluon")
    from lowbit.kernels import w4a16_gluon_gemv

    weight = pack_quantized_weight(quantized(192, 512, IntegerFormat(4, symmetric=False, group_size=128), seed=1))
    with w4a16_gluon.pinned_config("16x128 span 256 w4"), pytest.raises(ValueError, match="does not fit a 192x512"):
        w4a16_gluon.matmul(torch.zeros(3, 512, dtype=torch.bfloat16), weight)
    wide = pack_quantized_weight(quantized(512, 512, IntegerFormat(4, symmetric=True, group_size=128), seed=2))
    with w4a16_gluon_gemv.pinned_config("1x256x32 span 1024 w4"), pytest.raises(ValueError, match="pin one that fits"):
        w4a16_gluon_gemv.matmul(torch.zeros(1, 512, dtype=torch.bfloat16), wide)


def test_the_gluon_gemv_tuner_is_offered_configs_that_fit_the_shape():
    """Whole column tiles of at most four words a thread, tiles of K within a group, spans of whole
    groups dividing K, 96 to 4096 programs, or the nearest number there is where a weight is too
    small or too large for those; tiles of eight word rows instead of four, and one tile's words in
    flight instead of two, are variants tried on the finalists only."""
    pytest.importorskip("triton.experimental.gluon")
    from lowbit.kernels import w4a16_gluon_gemv as gemv
    from lowbit.kernels.autotune import every_candidate

    assert not any("ahead" in gemv._describe(c) or "x64 " in gemv._describe(c) for c in gemv._tuned().configs)
    configs = every_candidate(gemv._tuned())

    def described(n: int, k: int, group: int = 128) -> set[str]:
        return {gemv._describe(c) for c in gemv._prune(configs, {"N": n, "K": k}, GROUP=group, SYMMETRIC=False)}

    gate_up = described(14336, 4096)
    assert {"1x512x32 span 128 w4", "1x512x32 span 128 w4 ahead 1", "1x256x64 span 128 w8",
            "1x1024x32 span 512 w8"} <= gate_up
    assert "1x1024x32 span 1024 w8" not in gate_up  # 56 programs
    assert not any(name.startswith("1x1024") and " w4" in name for name in gate_up)  # 8 words a thread
    assert described(256, 256) == {f"1x256x{bk} span 128 w{w}{ahead}" for w in (4, 8)  # 2 programs: the most
                                   for bk, ahead in ((32, ""), (64, ""), (32, " ahead 1"))}
    assert not any("x64 " in name for name in described(14336, 4096, group=32))
    huge = described(256 * 9001, 128)  # 9001 programs at the fewest
    assert huge and all(name.startswith("1x256x") for name in huge)
    assert not any("span 128 " in name for name in described(14336, 4096, group=256))


def test_the_gluon_gemv_benchmark_reports_the_ratio():
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_gluon_gemv")
    assert "1x512x32 span 128 w4 ahead 1" in script.configs(14336, 4096)
    row = {"shape": "8B gate/up_proj", "gluon config": "1x512x32 span 128 w4", "gluon us": 12.0, "gluon error": 1.7e-3,
           "triton config": "1x512x32 split 32 f16 pipeline 2", "triton us": 13.5}
    assert ("| 8B gate/up_proj | 1x512x32 span 128 w4 | 12.0 | 1.7e-03 | 1x512x32 split 32 f16 pipeline 2 | 13.5 "
            "| 0.89 |") in script.markdown([row], "GPU")


@needs_gluon_gpu
@pytest.mark.parametrize("group, symmetric", [(32, False), (64, True), (128, False), (128, True), (256, False)])
def test_the_gluon_gemv_matches_float64_and_leaves_the_workspace_zero(group, symmetric):
    """Tuned over every candidate, each of which ran on the shared split-K workspace; x with an
    outlier, so the rows' power-of-two factors differ."""
    from lowbit.kernels import w4a16_gluon_gemv, w4a16_triton

    weight = quantized(1024, 2048, IntegerFormat(4, symmetric=symmetric, group_size=group), seed=group)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    x[0, 77] = 300.0
    ref = x.double() @ weight.dequantize().double().cuda().T
    for _ in range(2):
        assert relative_error(w4a16_gluon_gemv.matmul(x, packed), ref) < 1e-2
        torch.cuda.synchronize()
        ws, counters = w4a16_triton.split_k_workspace(x.device, 1024)
        assert not ws[:1024].any() and not counters[:1024].any()
    assert w4a16_gluon_gemv.tuned_config(packed) is not None


@needs_gluon_gpu
@pytest.mark.parametrize("config, n, k", [("1x512x32 span 128 w4", 1024, 1024),
                                          ("1x256x64 span 1024 w8", 768, 3072),
                                          ("1x1024x32 span 256 w8", 2048, 1536),
                                          ("1x256x32 span 2048 w4 ahead 1", 512, 2048)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_each_gluon_gemv_config_is_right(config, n, k, symmetric):
    """Spans of one group to all of K (no split), 8 and 4 warps, tiles of 4 and 8 word rows, words
    one tile ahead or two: the tuner may choose any of them."""
    from lowbit.kernels import w4a16_gluon_gemv

    assert pinned_config_error(w4a16_gluon_gemv, config, 1, n, k, symmetric, seed=n + k) < 1e-2


def test_the_tma_gemv_experiment_copies_each_group_once_and_offers_rings_that_fit():
    """One TMA copy per group of words (the whole span's at the start where it has buffers for
    all), none of the words loaded from global memory by the threads, and a ring only where the
    span has more groups than buffers."""
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_gemv_tma")
    for config, copies in [(script.Config(256, 4, 32, 256, 2), 2), (script.Config(128, 4, 64, 1024, 4), 4 + 1)]:
        ptx = script.compile_for_sm90(config).asm["ptx"]
        assert ptx.count("cp.async.bulk.tensor.2d.shared::cluster.global") == copies  # the ring's refill: one more
        assert "ld.global.v2.b32" not in ptx and "ld.global.v4.b32" not in ptx
    offered = script.configs(14336, 4096)
    assert script.Config(256, 4, 32, 256, 2) in offered and script.Config(256, 4, 32, 256, 4) not in offered
    assert all(script.shared_bytes(c) <= script.MAX_SHARED and c.block_n // (32 * c.warps) in (1, 2) for c in offered)


def test_the_last_adder_tail_needs_no_counter_and_no_fence():
    """Each element's partial sum goes in by one returning 64-bit add, relaxed: no tile counter's
    acquire-release atomic, no workspace read-back."""
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_gemv_tma")
    ptx = script.compile_for_sm90(script.Config(256, 4, 32, 256, 2), tail=4).asm["ptx"]
    atomics = set(re.findall(r"atom\.[\w.]+", ptx))
    assert atomics == {"atom.global.gpu.relaxed.add.u64"} and "ld.global.cg" not in ptx
    counter = script.compile_for_sm90(script.Config(256, 4, 32, 256, 2)).asm["ptx"]
    assert "atom.global.gpu.acq_rel.add.u32" in counter


def test_the_tile_tail_experiment_swaps_only_the_tail_of_its_own_copies():
    """Each copy of the 16-row tile compiles with its own tail (the counter's acquire-release
    atomic, the adds alone, no atomics, the last adder's 64-bit add), and the module's kernel keeps
    the counter."""
    pytest.importorskip("triton.experimental.gluon")
    from lowbit.kernels.w4a16_gluon_kernel import compile_for_sm90, compile_gluon_for_sm90
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_m16_tail")
    constexprs = {"GROUP": 128, "SYMMETRIC": False, "ZERO": 8, "BLOCK_N": 128, "K_SPAN": 512, "WARPS": 4,
                  "FOLD_ZEROS": True, "AHEAD": 1, "FINISH": True}
    expected = {"counter": {"atom.global.gpu.acq_rel.add.u32", "atom.global.gpu.relaxed.add.v2.f32"},
                "adds alone": {"atom.global.gpu.relaxed.add.v2.f32"}, "none": set(),
                "last adder": {"atom.global.gpu.relaxed.add.u64"}}
    for name, tail in script.TAILS.items():
        types = {"ws_ptr": "*i64"} if name == "last adder" else None
        ptx = compile_gluon_for_sm90(script.kernel_with_tail(tail), constexprs, 4, types=types).asm["ptx"]
        assert set(re.findall(r"atom\.[\w.]+", ptx)) == expected[name], name
    assert "atom.global.gpu.acq_rel.add.u32" in compile_for_sm90(128, 512, ahead=1).asm["ptx"]


def test_the_tma_gemv_tables_name_their_columns():
    pytest.importorskip("triton.experimental.gluon")
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_gemv_tma")
    row = {"shape": "8B q/o_proj", "config": "1x64x32 span 256 w2 stages 2", "last-adder error": 1.7e-3,
           **{part: 6.0 for part in script.PARTS}, "Gluon GEMV": 6.3}
    table = script.anatomy_markdown([row], "GPU")
    assert "| whole | no split-K tail | tail: adds alone | tail: counter alone | last-adder tail |" in table
    assert table.rstrip().endswith("| 6.0 | 6.0 | 6.0 | 6.3 | 1.7e-03 |")
    flushes = benchmark_script("gpu_flush_kind")
    row = {"shape": "8B q/o_proj", "m": 1, "path": "gluon-gemv"}
    row.update({f"{c} {f}": t for f, (b, i) in {"write 2xL2": (15.4, 6.0), "read 2xL2": (12.6, 5.5),
                                               "read 4xL2": (12.8, 5.6)}.items() for c, t in (("bf16", b), ("int4", i))})
    assert "| 8B q/o_proj | 1 | gluon-gemv | 15.4 | 6.0 | 2.57x | 12.6 | 5.5 | 2.29x | 12.8 | 5.6 | 2.29x |" in \
        flushes.markdown([row], "GPU")


@needs_gluon_gpu
@pytest.mark.parametrize("config, n, k", [((256, 4, 32, 256, 2), 512, 1024), ((128, 4, 64, 1024, 2), 384, 2048),
                                          ((256, 8, 32, 128, 1), 256, 768)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_the_tma_gemv_experiment_matches_float64_on_every_launch(config, n, k, symmetric):
    """Whole spans and rings, with the counter tail and the last-adder tail; launched several
    times, since a buffer overwritten while its reads were in flight shows only once the words come
    from L2 (round 16's TMA race), and the last adders must leave their workspace zero."""
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_gemv_tma")
    weight = quantized(n, k, IntegerFormat(4, symmetric=symmetric, group_size=128), seed=n + k)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ weight.dequantize().double().cuda().T
    for _ in range(5):
        assert relative_error(script.launch(x, packed, script.Config(*config)), ref) < 1e-2
        assert relative_error(script.launch(x, packed, script.Config(*config), TAIL=4), ref) < 1e-2


@needs_gluon_gpu
def test_the_dispatcher_offers_the_gluon_gemv_for_one_bf16_row_only():
    from lowbit.kernels.w4a16 import path_matmuls

    packed = pack_quantized_weight(quantized(512, 1024, IntegerFormat(4, symmetric=False, group_size=128),
                                             seed=3)).to("cuda")
    assert "gluon-gemv" in path_matmuls(1, packed, torch.bfloat16)
    assert "gluon-gemv" not in path_matmuls(2, packed, torch.bfloat16)
    assert "gluon-gemv" not in path_matmuls(1, packed, torch.float16)
    check_dispatcher_allowing("gluon-gemv", 512, leading=(1, 1))


@needs_gluon_gpu
@pytest.mark.parametrize("m", [1, 5, 24, 40])
def test_a_pending_product_is_the_finished_one_before_its_rounding(m):
    """pending_matmul answers None until the dispatcher chose a path for the shape, then leaves the
    product's float32 sums in its buffer: rounded, they are the finished product (up to the
    order of the split-K adds); Pending.finish zeroes the buffer for the next product."""
    from lowbit.kernels import decode_ops

    weight = quantized(512, 1024, IntegerFormat(4, symmetric=False, group_size=128), seed=m)
    packed = pack_quantized_weight(weight).to("cuda")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    w4a16.use_paths()
    assert w4a16.pending_matmul(x, packed) is None  # nothing chosen yet
    finished = w4a16.w4a16_matmul(x, packed)
    if w4a16.chosen_path(x, packed) != ("gluon-gemv" if m == 1 else "gluon"):
        pytest.skip("the dispatcher chose a path that cannot leave its product pending")
    for _ in range(3):
        sums = w4a16.pending_matmul(x, packed)
        assert sums is not None and sums.dtype == torch.float32 and sums.shape == (m, 512)
        value = decode_ops.Pending(sums, torch.bfloat16).finish()
        assert not sums.any()
        torch.testing.assert_close(value, finished, rtol=1e-2, atol=1e-2)
        assert relative_error(value, x.double() @ weight.dequantize().double().cuda().T) < 1e-2
    w4a16.use_paths("fused")
    assert w4a16.pending_matmul(x, packed) is None  # the fused Triton tile cannot
    w4a16.use_paths()
