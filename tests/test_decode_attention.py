"""decode_attention: attention of one decode position over the cache's written prefix, against
float64 softmax attention over that prefix; its Triton kernel in the interpreter, for sm_90, and on a GPU."""

from __future__ import annotations


import pytest
import torch

from lowbit.kernels import decode_attention
from lowbit.kernels.w4a16 import triton_available
from lowbit.kv.row_codes import CODES, CodedCache, dequantize_rows
from tests.conftest import check_in_triton_interpreter

gpu = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")

CASES = [  # batch, heads, kv_heads, head_dim, cache positions, position
    (1, 32, 8, 128, 300, 299),  # grouped-query, five chunks of 64
    (1, 32, 8, 128, 300, 5),  # one chunk: written directly
    (2, 8, 8, 64, 200, 130),  # multi-head (one query head a kv head)
    (3, 16, 2, 64, 96, 70),
    (1, 4, 1, 32, 1100, 1099),  # multi-query, sixteen chunks of two blocks
    (2, 12, 4, 80, 150, 149),  # head_dim no power of two
    (1, 32, 2, 64, 700, 650),  # sixteen heads a group: merged eight at a time
]


def coded_cache(entries: torch.Tensor, position: int, kind: str) -> CodedCache:
    """`entries` [batch, kv_heads, max_len, D] written into a coded cache of `kind` up to `position`
    (the last written, so the one kept exact)."""
    batch, kv_heads, max_len, dim = entries.shape
    cache = CodedCache.empty(batch, kv_heads, max_len, dim, entries.device, entries.dtype, CODES[kind])
    cache.write(entries[:, :, : position + 1], torch.arange(position + 1, device=entries.device))
    return cache


def as_read(cache: CodedCache, position: int) -> torch.Tensor:
    """What attention at `position` must read from a coded cache, built from its parts: each code
    times its scale, rounded once, and the exact entry at the position itself."""
    entries = dequantize_rows(cache.codes.cpu(), cache.scales.cpu(), cache.dtype)
    entries[:, :, position] = cache.latest.cpu()
    return entries


def check_cases(device: str, dtype: torch.dtype, tolerance: float, coded: str | None = None) -> None:
    """Every case twice (the second finds the counters the first's last programs reset), then the
    counters zero; in `dtype` on `device` against float64 (with `coded`, over a cache of that kind,
    against float64 attention over the entries it holds)."""
    g = torch.Generator().manual_seed(0)
    for batch, heads, kv_heads, dim, max_len, position in CASES:
        q = torch.randn(batch, heads, 1, dim, generator=g).to(device, dtype)
        keys, values = (torch.randn(batch, kv_heads, max_len, dim, generator=g).to(device, dtype) for _ in range(2))
        pos = torch.tensor([position], device=device)
        if coded:
            keys, values = coded_cache(keys, position, coded), coded_cache(values, position, coded)
            expected = decode_attention.reference_attention(q.cpu(), as_read(keys, position),
                                                            as_read(values, position), position)
        else:
            expected = decode_attention.reference_attention(q.cpu(), keys.cpu(), values.cpu(), position)
        for _ in range(2):
            out = decode_attention.attend(q, keys, values, pos)
            assert out.shape == (batch, 1, heads * dim) and out.dtype == dtype
            error = float((out.cpu().double() - expected).norm() / expected.norm())
            assert error < tolerance, (batch, heads, kv_heads, dim, max_len, position, error)
    assert all(not counters.any() for *_, counters in decode_attention._WORKSPACE.values())


def test_the_torch_path_attends_over_the_written_positions_only():
    check_cases("cpu", torch.float32, 1e-5)
    for kind in CODES:
        check_cases("cpu", torch.float32, 1e-5, coded=kind)


@pytest.mark.parametrize("kind, step", [("int8-token", 1 / 254), ("fp8", 2.0**-4)])
def test_a_coded_cache_reads_its_codes_and_the_last_position_exactly(kind, step):
    """The entries attention reads: within half a step of what was written (int8: half of
    max|row| / 127; e4m3: its half unit, 2^-4 relative to a row's largest), and exactly what was
    written at the last position."""
    g = torch.Generator().manual_seed(1)
    entries = torch.randn(2, 3, 20, 16, generator=g) * torch.logspace(-3, 3, 16)  # channels of six decades
    cache = coded_cache(entries, 12, kind)
    read = as_read(cache, 12)
    assert torch.equal(read[:, :, 12], entries[:, :, 12])
    bound = entries[:, :, :12].abs().amax(dim=-1, keepdim=True) * step * (1 + 1e-6)
    assert ((read[:, :, :12] - entries[:, :, :12]).abs() <= bound).all()
    assert torch.equal(cache.read_at(torch.tensor([12]))[:, :, :13], read[:, :, :13])
    assert not cache.codes[:, :, 13:].float().any() and not cache.scales[:, :, 13:].any()


def test_the_kernel_in_the_interpreter():
    """float16 (the interpreter's bf16 arithmetic is not the GPU's), in a subprocess since the flag
    is read at import."""
    pytest.importorskip("triton")
    script = ("import torch\n"
              "from lowbit.kernels import decode_attention\n"
              "from tests.test_decode_attention import check_cases\n"
              "assert decode_attention._on_triton(torch.zeros(1, 4, 1, 8, dtype=torch.float16),"
              " *[torch.zeros(1, 2, 8, 8, dtype=torch.float16)] * 2)\n"
              "check_cases('cpu', torch.float16, 2e-3)\n"
              "check_cases('cpu', torch.float16, 2e-3, coded='fp8')\n"
              "check_cases('cpu', torch.float16, 2e-3, coded='int8-token')\n"
              "print('ok')\n")
    check_in_triton_interpreter(script, timeout=600)


def test_the_written_prefix_is_cut_into_enough_chunks_to_fill_the_gpu():
    assert decode_attention.splits_for(batch=1, kv_heads=8, max_len=4096) == 16
    assert decode_attention.splits_for(batch=16, kv_heads=8, max_len=4096) == 1
    assert decode_attention.splits_for(batch=2, kv_heads=8, max_len=4096) == 8
    assert decode_attention.splits_for(batch=1, kv_heads=8, max_len=100) == 2  # no chunk under a block


@pytest.mark.parametrize("codes", ["*bf16", "*fp8e4nv", "*i8"])
def test_the_kernel_compiles_for_hopper_onto_the_tensor_cores(codes):
    """q·kᵀ and p·v as MMAs, keys and values brought by asynchronous copies (the pipelined loop
    the interpreter cannot run), and the chunks' count published by an acquire-release atomic;
    a coded cache's codes multiplied in float16, fp8 ones converted by the hardware's e4m3
    conversion."""
    pytest.importorskip("triton")
    ptx = decode_attention.compile_for_sm90(codes, KV_HEADS=8, GROUP=4, GROUP_ROWS=16, DIM=128, BLOCK_D=128,
                                            SPLITS=16, SPLITS_P2=16, GROUP_P2=4).asm["ptx"]
    assert "mma.sync" in ptx or "wgmma" in ptx
    assert "cp.async" in ptx
    assert "atom.global.gpu.acq_rel.add" in ptx
    assert ("e4m3" in ptx) == (codes == "*fp8e4nv")
    assert ("f32.f16.f16.f32" in ptx) == (codes != "*bf16")


def test_the_merge_of_large_groups_does_not_spill():
    """Sixteen query heads a kv head over sixteen chunks: merged all at once, the partial outputs
    alone were 512 registers a thread and the kernel spilled; a few heads a pass fit."""
    pytest.importorskip("triton")
    from tests.conftest import benchmark_script

    compiled = decode_attention.compile_for_sm90(KV_HEADS=2, GROUP=16, GROUP_ROWS=16, DIM=128, BLOCK_D=128,
                                                 SPLITS=16, SPLITS_P2=16, GROUP_P2=16)
    sass, registers, _ = benchmark_script("gemv_sass").disassemble(compiled)
    assert "STL" not in sass and registers < 255


@gpu
def test_the_kernel_on_gpu():
    check_cases("cuda", torch.bfloat16, 1e-2)
    for kind in CODES:
        check_cases("cuda", torch.bfloat16, 1e-2, coded=kind)


@gpu
def test_one_captured_call_serves_every_position():
    """The position is read on the device: a CUDA graph captured at one position, replayed at
    others, attends over each one's prefix (one chunk, several, all of the cache)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 32, 1, 128, generator=g).to("cuda", torch.bfloat16)
    keys, values = (torch.randn(1, 8, 2048, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    pos = torch.tensor([10], device="cuda")
    decode_attention.attend(q, keys, values, pos)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention.attend(q, keys, values, pos)
    for position in (0, 10, 63, 64, 1000, 2047):
        pos.fill_(position)
        graph.replay()
        expected = decode_attention.reference_attention(q.cpu(), keys.cpu(), values.cpu(), position)
        assert float((out.cpu().double() - expected).norm() / expected.norm()) < 1e-2, position


def test_the_benchmark_times_each_setting_beside_sdpa(monkeypatch):
    """Each "TARGET_PROGRAMS/STAGES[/WARPS]" setting runs with the module's own restored after it,
    and the table has one column per setting."""
    from tests.conftest import benchmark_script

    script = benchmark_script("gpu_decode_attention")
    seen = []
    monkeypatch.setattr(decode_attention, "attend", lambda *args: seen.append(
        (decode_attention.TARGET_PROGRAMS, decode_attention.STAGES, decode_attention.WARPS)))
    script.attend_with("384/2", None)
    script.attend_with("128/3/8", None)
    assert seen == [(384, 2, 4), (128, 3, 8)]
    assert (decode_attention.TARGET_PROGRAMS, decode_attention.STAGES, decode_attention.WARPS) == (128, 3, 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "GPU")
    row = {"batch": 16, "max_len": 4096, "position": 1023, "sdpa us": 66.0, "sdpa error": 2.2e-3,
           "lowbit 128/3 us": 22.0, "lowbit 128/3 error": 2.1e-3, "lowbit 128/2 us": 33.0, "lowbit 128/2 error": 2.1e-3}
    table = script.markdown([row])
    assert "| batch | cache positions | position | sdpa (masked, all positions) | lowbit 128/3 | lowbit 128/2 |" in table
    assert "| 16 | 4096 | 1023 | 66.0 | 22.0 | 33.0 | 3.00x | 2.2e-03 | 2.1e-03 |" in table
