"""AWQ: folding preserves the model, the search against explicit token products, the pipeline hook,
the clip search against a brute-force reference, recipes, CLI and export of the folded norms."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats import IntegerFormat, QuantizedWeight, WeightFormat
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe, RecipeError
from lowbit.solvers.awq import AWQ as AWQSolver
from lowbit.solvers.base import Solver
from lowbit.solvers.gptq import layer_output_error
from lowbit.solvers.rtn import RTN
from lowbit.transforms.awq import AWQ, can_absorb, channel_scales, fold_scales, search_scales
from lowbit.transforms.base import SharedInput
from tests.conftest import tiny_llama_config

FMT = IntegerFormat(bits=3, symmetric=False, group_size=16)


def tiny(seed: int = 0, gqa: bool = True) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(num_key_value_heads=2 if gqa else 4)
    return LlamaForCausalLM(config).eval()


def shared_inputs(model, block_index: int, hessian_seed: int = 0) -> list[SharedInput]:
    """The block's groups with made-up statistics (folding preserves the function for any scales)."""
    arch = architecture_of(model)
    block = arch.block_list(model)[block_index]
    generator = torch.Generator().manual_seed(hessian_seed)
    groups = []
    for names, source in zip(arch.linear_groups, arch.input_sources):
        members = [block.get_submodule(name) for name in names]
        columns = members[0].in_features
        x = torch.randn(256, columns, generator=generator) * torch.rand(columns, generator=generator) * 4
        groups.append(SharedInput(names, members, [FMT] * len(members), block.get_submodule(source),
                                  hessian=2 / 256 * x.T @ x, mean_abs=x.abs().mean(0)))
    return groups


@pytest.fixture
def ids():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("gqa", [True, False])
def test_folded_scales_preserve_the_fp_model(ids, gqa):
    model = tiny(gqa=gqa)
    expected = model(input_ids=ids).logits
    folded = 0
    for index in range(2):
        for group in shared_inputs(model, index):
            if can_absorb(group):
                scales = torch.rand(group.features, generator=torch.Generator().manual_seed(index)) * 4 + 0.1
                fold_scales(group, scales)
                folded += 1
    # q/k/v, gate/up and down everywhere; o after v only without grouped-query attention.
    assert folded == (3 if gqa else 4) * 2
    got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_awq_transform_preserves_model_and_skips_gqa_o_proj(ids):
    model = tiny(gqa=True)
    expected = model(input_ids=ids).logits
    o_proj = model.model.layers[0].self_attn.o_proj.weight.clone()
    AWQ().apply(shared_inputs(model, 0))
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, o_proj)  # v_proj has 32 rows, o_proj 64 inputs
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, tiny(gqa=True).model.layers[0].mlp.down_proj.weight)
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-4)


def test_search_errors_are_explicit_output_errors():
    """Each α's error (from the Hessian) equals the squared output error on explicit tokens."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, 24, bias=False), torch.nn.Linear(32, 8, bias=False)]
    x = torch.randn(300, 32) * (torch.rand(32) * 5)
    group = SharedInput(("a", "b"), linears, [FMT, None], torch.nn.LayerNorm(32),
                        hessian=2 / 300 * x.T @ x, mean_abs=x.abs().mean(0))
    scales, alpha, errors = search_scales(group, grid=10)
    w = linears[0].weight.detach()
    for step, error in enumerate(errors):
        s = channel_scales(x.abs().mean(0), step / 10)
        w_hat = RTN().solve(w * s, FMT).dequantize() / s  # member b is not quantized: no error
        explicit = 2 / 300 * float(((x @ w.T - x @ w_hat.T) ** 2).sum())
        assert error == pytest.approx(explicit, rel=1e-3)
    assert errors[0] == pytest.approx(2 / 300 * float(((x @ (w - RTN().solve(w, FMT).dequantize()).T) ** 2).sum()), rel=1e-3)
    assert alpha == errors.index(min(errors)) / 10
    assert torch.allclose(scales, channel_scales(x.abs().mean(0), alpha))


def test_search_beats_rounding_on_salient_channels():
    """Inputs where a few channels carry most of the magnitude: the case AWQ was made for."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    magnitude = torch.ones(64)
    magnitude[:4] = 20.0
    x = torch.randn(512, 64, generator=generator) * magnitude
    group = SharedInput(("a",), [linear], [FMT], torch.nn.LayerNorm(64), hessian=2 / 512 * x.T @ x,
                        mean_abs=x.abs().mean(0))
    _, alpha, errors = search_scales(group, grid=20)
    assert alpha > 0 and min(errors) < 0.7 * errors[0]


def test_channel_scales_are_normalised():
    s = channel_scales(torch.tensor([0.0, 0.5, 2.0, 8.0]), 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert torch.equal(channel_scales(torch.rand(8), 0.0), torch.ones(8))


# --- the pipeline hook ------------------------------------------------------------------------


@dataclass
class Capture(Solver):
    name: ClassVar[str] = "capture"
    needs_hessian: ClassVar[bool] = True
    hessians: dict = field(default_factory=dict)
    count: int = 0

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        self.hessians[self.count] = stats.hessian.clone()
        self.count += 1
        return RTN().solve(weight, fmt)


def run(model, ids, solver, **kwargs) -> dict[str, QuantizedWeight]:
    results = {}
    SequentialQuantizer(model, architecture_of(model), lambda name, linear: (FMT, solver),
                        on_quantized=results.__setitem__, transforms=[AWQ()], **kwargs).run(ids)
    return results


def test_solvers_see_the_rescaled_input(ids):
    model = tiny()
    original = copy.deepcopy(model)
    solver = Capture()
    run(model, ids, solver)
    # Block 0's q/k/v read input_layernorm(embeddings): after the run its weight is the folded one.
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, original.model.layers[0].input_layernorm.weight)
    original.model.layers[0].input_layernorm.weight.data = norm.clone()
    seen = []
    handle = original.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    original(input_ids=ids)
    handle.remove()
    x = seen[0].reshape(-1, 64)
    assert torch.allclose(solver.hessians[0], 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5)


def test_single_pass_and_batched_passes_agree_with_transforms(ids):
    single = run(tiny(), ids, RTN())
    batched = run(tiny(), ids, RTN(), batch_size=1)
    for name in single:
        assert (single[name].codes == batched[name].codes).float().mean() > 0.99, name


def test_transforms_without_calibration_are_refused():
    with pytest.raises(ValueError, match="calibration"):
        run(tiny(), None, RTN())


def test_awq_beats_rtn_on_model_output(ids):
    """End to end on the tiny model: the folded-and-rounded model is closer to the original."""
    reference = tiny()
    expected = reference(input_ids=ids).logits
    rtn, awq = tiny(), tiny()
    SequentialQuantizer(rtn, architecture_of(rtn), lambda n, l: (FMT, RTN())).run(None)
    SequentialQuantizer(awq, architecture_of(awq), lambda n, l: (FMT, AWQSolver(clip_search=False)),
                        transforms=[AWQ()]).run(ids)
    error = lambda model: float((model(input_ids=ids).logits - expected).detach().square().mean())  # noqa: E731
    assert error(awq) < error(rtn)


# --- the awq method's clip search --------------------------------------------------------------


def test_output_clip_search_matches_brute_force():
    torch.manual_seed(0)
    w = torch.randn(6, 32) * 0.05
    x = torch.randn(200, 32) * (torch.rand(32) * 3)
    stats = HessianStats(32)
    stats.add(x)
    solver = AWQSolver(grid=20, max_shrink=0.5)
    got = solver.solve(w, FMT, stats).dequantize()
    expected = torch.zeros_like(w)
    for start in range(0, 32, 16):
        for row in range(6):
            part = w[row : row + 1, start : start + 16]
            xs = x[:, start : start + 16]
            candidates = [FMT.fit(part, clip=1.0 - step / 20) for step in range(10)]
            errors = [float(((xs @ (FMT.round_trip(part, p) - part).T) ** 2).sum()) for p in candidates]
            expected[row, start : start + 16] = FMT.round_trip(part, candidates[errors.index(min(errors))])[0]
    assert torch.allclose(got, expected, atol=1e-6)
    H = stats.hessian
    assert layer_output_error(w, got, H) <= layer_output_error(w, RTN().solve(w, FMT).dequantize(), H)


# --- recipes, CLI, export ---------------------------------------------------------------------------


def test_recipe_transforms(tmp_path):
    recipe = Recipe(method="gptq", transforms=["awq"], bits=4, group_size=32)
    path = tmp_path / "r.yaml"
    recipe.save(path)
    loaded = Recipe.load(path)
    assert loaded.transform_names() == ["awq"] and loaded.needs_calibration()
    assert loaded.describe().startswith("awq+gptq")
    assert Recipe(method="awq").transform_names() == ["awq"]
    assert Recipe(method="awq", transforms=["awq"]).transform_names() == ["awq"]
    assert not Recipe(method="hqq").needs_calibration()
    path.write_text("method: rtn\ntransforms: [rotate]\n")
    with pytest.raises(RecipeError, match="unknown transform 'rotate'"):
        Recipe.load(path)


def test_awq_export_writes_folded_norms_and_reloads(tmp_path, tiny_model_dir, wikitext):
    from lowbit.api import Settings, quantize
    from lowbit.export import load_quantized

    recipe = Recipe(method="awq", bits=4, symmetric=False, group_size=32)
    settings = Settings(calib=str(wikitext / "valid.txt"), samples=4, seq_len=64)
    report = quantize(str(tiny_model_dir), recipe, tmp_path / "out", settings, evaluate_result=False)
    assert report.export_max_abs_diff == 0.0
    reloaded, _ = load_quantized(tmp_path / "out")
    model = report.quantized_model
    norm = model.model.layers[1].post_attention_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # folded (a fresh Llama's norms are ones)
    assert torch.equal(reloaded.model.layers[1].post_attention_layernorm.weight, norm)


def test_cli_data_free_and_refusals(capsys, tmp_path, tiny_model_dir):
    from lowbit.cli import main

    def cli(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = cli("quantize", tiny_model_dir, "--method", "hqq", "--calib", "none", "--group-size", "32",
                    "--out", tmp_path / "hqq", "--no-eval")
    assert code == 0, out
    assert "none (data-free)" in out and "at most 0.00e+00" in out
    code, out = cli("quantize", tiny_model_dir, "--method", "awq", "--calib", "none", "--no-export", "--no-eval")
    assert code == 2 and "needs calibration data" in out
    code, out = cli("quantize", tiny_model_dir, "--method", "easyquant", "--calib", "none", "--group-size", "32",
                    "--no-export", "--no-eval")
    assert code == 0, out
