"""Vector quantization: k-means, the GPTVQ-style solver, storage, decode paths and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.export.lowbit_load import load_lowbit_weights
from lowbit.export.vector_layout import pack_bits, unpack_bits
from lowbit.formats.base import FormatError
from lowbit.formats.vector import VectorFormat, kmeans_plus_plus, nearest_codewords, weighted_kmeans
from lowbit.kernels.vq_matmul import PackedVQ, vq_matmul
from lowbit.models.architectures import architecture_of
from lowbit.modules import VQLinear, replace_linears
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe
from lowbit.solvers.gptq import inverse_hessian_factor, layer_output_error
from lowbit.solvers.vq import VQ
from tests.test_export import assert_reloads_exactly, export, logits, tiny_llama

REPO = Path(__file__).resolve().parents[1]


class Stats:
    def __init__(self, hessian: torch.Tensor) -> None:
        self.hessian = hessian


def problem(rows: int = 32, columns: int = 48, tokens: int = 256, seed: int = 0, dtype=torch.float64):
    """A weight and a correlated-input Hessian H = 2/n XᵀX, as calibration gives."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g, dtype=dtype) * torch.linspace(0.2, 2, rows, dtype=dtype)[:, None]
    x = torch.randn(tokens, columns, generator=g, dtype=dtype) @ torch.randn(columns, columns, generator=g, dtype=dtype)
    x = x * 0.3 + torch.randn(columns, generator=g, dtype=dtype)
    return w, Stats(2 * x.T @ x / tokens)


# ---- k-means and nearest codewords ----------------------------------------------------------------


def slow_nearest(x, codebook, weight):
    return torch.tensor([
        min(range(len(codebook)), key=lambda k: float(sum(weight[i, t] * (x[i, t] - codebook[k, t]) ** 2
                                                          for t in range(x.shape[1]))))
        for i in range(len(x))
    ])


def test_nearest_codewords_match_a_loop_with_per_point_and_shared_weights():
    g = torch.Generator().manual_seed(0)
    x, book = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    weight = torch.rand(40, 3, generator=g, dtype=torch.float64)
    assert torch.equal(nearest_codewords(x, book, weight), slow_nearest(x, book, weight))
    shared = torch.rand(3, generator=g, dtype=torch.float64)
    assert torch.equal(nearest_codewords(x, book, shared), slow_nearest(x, book, shared.expand(40, 3)))
    assert torch.equal(nearest_codewords(x, book), slow_nearest(x, book, torch.ones(40, 3)))


def test_weighted_lloyd_matches_a_textbook_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    weight = torch.rand(60, 2, generator=g, dtype=torch.float64) + 0.1
    seeds = kmeans_plus_plus(x, weight, 5, torch.Generator().manual_seed(0))
    expected = seeds.clone()
    for _ in range(10):
        assignment = slow_nearest(x, expected, weight)
        for k in range(5):
            for t in range(2):
                members = assignment == k
                if weight[members, t].sum() > 0:
                    expected[k, t] = (weight[members, t] * x[members, t]).sum() / weight[members, t].sum()
    assert torch.allclose(weighted_kmeans(x, weight, seeds, 10), expected, atol=1e-12)
    # Seeds are data points, distinct, and the objective fell from them.
    assert all(any(torch.equal(seed, point) for point in x) for seed in seeds)
    assert len({tuple(seed.tolist()) for seed in seeds}) == 5


def test_weighted_kmeans_follows_the_weights():
    """Two clusters whose second coordinate is weightless are split along the first one only."""
    x = torch.tensor([[0.0, 5.0], [0.1, -5.0], [10.0, 3.0], [10.1, -3.0]])
    weight = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    centroids = weighted_kmeans(x, weight, torch.tensor([[0.0, 0.0], [1.0, 0.0]]), 10)
    assert torch.allclose(centroids[:, 0].sort().values, torch.tensor([0.05, 10.05]))


# ---- the solver -----------------------------------------------------------------------------------


def textbook_vq(w, hessian, fmt, damp=0.01):
    """GPTVQ one vector at a time, no lazy batches: nearest codeword under 1/U[t, t]², then GPTQ's
    column update for each of its columns with the codeword fixed."""
    W = w.clone()
    U, _ = inverse_hessian_factor(hessian, damp)
    scale = fmt.fit(W).scale.to(W.dtype)
    d, stages = fmt.dim, [book[0].to(W.dtype) for book in fmt.codebooks]
    codes = torch.zeros(len(stages), W.shape[0], W.shape[1] // d, dtype=torch.long)
    for c in range(0, W.shape[1], d):
        weight = torch.stack([1 / U[t, t] ** 2 for t in range(c, c + d)])
        for r in range(W.shape[0]):
            target, q = W[r, c : c + d] / scale[r], torch.zeros(d, dtype=W.dtype)
            for s, book in enumerate(stages):
                k = min(range(len(book)), key=lambda k: float((weight * (target - q - book[k]) ** 2).sum()))
                codes[s, r, c // d] = k
                q = q + book[k]
            W[r, c : c + d] = W[r, c : c + d]  # unchanged until the column updates below
            for t in range(d):
                err = (W[r, c + t] - q[t] * scale[r]) / U[c + t, c + t]
                W[r, c + t + 1 :] -= err * U[c + t, c + t + 1 :]
    return codes


@pytest.mark.parametrize("fmt", [VectorFormat(dim=4, bits=4), VectorFormat(dim=2, bits=3, residual_bits=2, row_scale=True)],
                         ids=["d4", "d2-residual-rowscale"])
def test_solver_matches_the_textbook_loop(fmt):
    w, stats = problem(rows=6, columns=24)
    prepared = fmt.prepare(w, stats.hessian.diagonal())
    qweight = VQ(block_size=8).solve(w, prepared, stats)  # blocks split vectors' updates across batches
    assert torch.equal(qweight.codes.long(), textbook_vq(w, stats.hessian, prepared))


def test_error_feedback_reduces_the_layer_output_error():
    w, stats = problem(rows=64, columns=64, dtype=torch.float32)
    fmt = VectorFormat(dim=4, bits=6)
    plain = VQ(error_feedback=False).solve(w, fmt, stats)
    feedback = VQ().solve(w, fmt, stats)
    assert torch.equal(plain.format.codebooks[0], feedback.format.codebooks[0])  # same codebook, only codes differ
    assert feedback.metadata["hessian_error"] < 0.8 * plain.metadata["hessian_error"]
    assert feedback.metadata["hessian_error"] == pytest.approx(
        layer_output_error(w, feedback.dequantize(), stats.hessian), rel=1e-4)


def test_residual_codebook_and_row_scales_reduce_the_error():
    w, stats = problem(rows=64, columns=64, dtype=torch.float32)
    single = VQ().solve(w, VectorFormat(dim=4, bits=6), stats).metadata["hessian_error"]
    residual = VQ().solve(w, VectorFormat(dim=4, bits=6, residual_bits=6), stats).metadata["hessian_error"]
    scaled = VQ().solve(w, VectorFormat(dim=4, bits=6, row_scale=True), stats).metadata["hessian_error"]
    assert residual < 0.6 * single
    assert scaled < single  # rows span a 10x range of magnitudes (see problem())


def test_codebook_per_column_group():
    w, stats = problem(rows=64, columns=64, dtype=torch.float32)
    qweight = VQ().solve(w, VectorFormat(dim=4, bits=5, group_size=32), stats)
    assert qweight.format.codebooks[0].shape == (2, 32, 4)
    assert qweight.bits_per_weight() == pytest.approx(5 / 4 + 2 * 32 * 4 * 16 / 64**2)


def test_bad_settings_are_refused_with_what_to_change():
    w, stats = problem(rows=4, columns=24, dtype=torch.float32)
    with pytest.raises(FormatError, match="does not divide"):
        VQ().solve(w[:, :22], VectorFormat(dim=4, bits=2), Stats(stats.hessian[:22, :22]))
    with pytest.raises(FormatError, match="lower the codebook bits"):
        VQ().solve(w, VectorFormat(dim=4, bits=8), stats)
    with pytest.raises(FormatError, match="multiple of the vector"):
        VectorFormat(dim=4, group_size=30)
    with pytest.raises(FormatError, match="format vq"):
        from lowbit.formats.integer import IntegerFormat

        VQ().solve(w, IntegerFormat(bits=2), stats)


# ---- storage --------------------------------------------------------------------------------------


def test_bit_streams_round_trip():
    values = torch.randint(0, 1 << 11, (999,), generator=torch.Generator().manual_seed(0))
    packed = pack_bits(values, 11)
    assert packed.numel() == -(-999 * 11 // 8)
    assert torch.equal(unpack_bits(packed, 11, 999).long(), values)


def quantized_tiny_llama(recipe: Recipe):
    model = tiny_llama()
    qweights = {}
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    SequentialQuantizer(model, architecture_of(model), recipe.plan(),
                        on_quantized=lambda name, q: qweights.__setitem__(name, q)).run(calibration)
    return model, qweights


VQ_RECIPE = Recipe(method="vq", format="vq", bits=6, group_size=-1,
                   format_options={"dim": 4, "residual_bits": 4, "row_scale": True})


def test_export_of_a_bfloat16_model_does_not_warn_of_rounded_scales(tmp_path):
    """lowbit's layout decodes with the stored scales in float32 whatever the model's dtype, so the
    writer's warning about scales rounded to the model dtype (true of compressed-tensors layers)
    does not apply."""
    import warnings

    model, qweights = quantized_tiny_llama(VQ_RECIPE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(model.to(torch.bfloat16), qweights, tmp_path / "out")
    assert not [w for w in caught if "rounds them" in str(w.message)]


def test_export_reloads_exactly_and_stores_the_counted_bits(tmp_path):
    model, qweights = quantized_tiny_llama(VQ_RECIPE)
    out = export(model, qweights, tmp_path / "out")
    assert_reloads_exactly(model, qweights, out)
    tensors = load_file(str(out / "model.safetensors"))
    for name, qweight in qweights.items():
        stored = sum(t.numel() * t.element_size() for key, t in tensors.items()
                     if key.startswith(name + ".weight_") and not key.endswith("weight_shape"))
        counted = qweight.bits_per_weight() * qweight.weight_count / 8
        assert counted <= stored < counted + 2, name  # two index streams, each padded to a whole byte


def test_vq_linear_runs_the_reloaded_codes(tmp_path):
    model, qweights = quantized_tiny_llama(VQ_RECIPE)
    out = export(model, qweights, tmp_path / "out")
    expected = logits(model)
    replace_linears(model, load_lowbit_weights(out))
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), VQLinear)
    assert torch.allclose(logits(model), expected, atol=1e-4, rtol=1e-4)


# ---- decode ---------------------------------------------------------------------------------------


def random_packed(rows=24, columns=48, dim=4, bits=(5, 3), groups=2, seed=0) -> PackedVQ:
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, 1 << b, (rows, columns // dim), generator=g) for b in bits]).int()
    books = tuple(torch.randn(groups, 1 << b, dim, generator=g).half().float() for b in bits)
    return PackedVQ(codes, books, torch.rand(rows, 1, generator=g) + 0.5, dim)


@pytest.mark.parametrize("path", ["gather", "lut"])
@pytest.mark.parametrize("m", [1, 5])
def test_decode_paths_equal_dequantize_then_matmul(path, m):
    packed = random_packed()
    x = torch.randn(m, 3, packed.in_features, dtype=torch.float64).float()
    expected = x.double() @ packed.dequantize().double().T
    assert torch.allclose(vq_matmul(x, packed, path).double(), expected, atol=1e-4)


def test_dequantize_matches_the_format():
    w, stats = problem(rows=16, columns=32, dtype=torch.float32)
    qweight = VQ().solve(w, VectorFormat(dim=4, bits=4, residual_bits=3, group_size=16, row_scale=True), stats)
    module = VQLinear(qweight)
    assert torch.equal(module.dequantized_weight(), qweight.dequantize())


def test_triton_kernel_in_the_interpreter():
    """The Triton kernel on CPU through TRITON_INTERPRET=1 (in a subprocess: the flag is read at import)."""
    pytest.importorskip("triton")
    script = (
        "import torch\n"
        "from tests.test_vq import random_packed\n"
        "from lowbit.kernels.vq_triton import vq_matmul_triton\n"
        "for bits, m in (((5, 3), 3), ((6,), 1)):\n"
        "    packed = random_packed(rows=70, columns=72, dim=6, bits=bits, groups=3)\n"
        "    x = torch.randn(m, 72)\n"
        "    got = vq_matmul_triton(x, packed, block_n=32, block_k=32)\n"
        "    assert torch.allclose(got, x @ packed.dequantize().T, atol=1e-4), (got - x @ packed.dequantize().T).abs().max()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [(5, 3), (8,)])
@pytest.mark.parametrize("m", [1, 16, 33])
def test_triton_kernel_on_cuda_matches_dequantize_then_matmul(bits, m):
    """The compiled kernel at its default tiles, bf16 x as the model feeds it: within bf16 rounding."""
    packed = random_packed(rows=300, columns=512, dim=4, bits=bits, groups=2)
    packed = PackedVQ(packed.codes.cuda(), tuple(b.cuda() for b in packed.codebooks), packed.scale.cuda(), packed.dim)
    x = torch.randn(m, packed.in_features, device="cuda").bfloat16()
    expected = x.float() @ packed.dequantize().T
    got = vq_matmul(x, packed)  # picks the Triton path on CUDA
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


# ---- recipes and CLI ------------------------------------------------------------------------------


def test_recipes_refuse_mismatched_methods_and_options():
    with pytest.raises(ValueError, match="filled by method vq"):
        Recipe(method="gptq", format="vq", bits=8, group_size=-1)
    with pytest.raises(ValueError, match="needs format vq"):
        Recipe(method="vq", format="int", bits=4)
    with pytest.raises(ValueError, match="no option 'dims'"):
        Recipe(method="vq", format="vq", bits=8, group_size=-1, format_options={"dims": 4})
    with pytest.raises(ValueError, match="vector dimension"):
        Recipe(method="vq", format="vq", bits=8, group_size=-1, format_options={"dim": 9})
    assert "format_options" not in Recipe().model_dump()  # old recipes keep their cache keys
    assert VQ_RECIPE.describe() == "vq vq6, dim=4, residual_bits=4, row_scale=True per-channel"


@pytest.mark.slow
def test_cli_quantizes_exports_and_reloads_vq(capsys, tmp_path, tiny_model_dir):
    from tests.test_cli import run_cli

    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--method", "vq", "--format", "vq",
                        "--vq-dim", "4", "--codebook-bits", "6", "--residual-bits", "4", "--row-scale",
                        "--samples", "2", "--seq-len", "32", "--calib", "self", "--out", str(out_dir), "--no-eval")
    assert code == 0, out
    assert "differ from the in-memory model by at most 0.00e+00" in out and "(lowbit)" in out
    code, out = run_cli(capsys, "quantize", str(tiny_model_dir), "--format", "vq", "--method", "gptq")
    assert code == 2 and "filled by method vq" in out
