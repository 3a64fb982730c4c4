"""The sequential pipeline: what each layer is calibrated on, and equivalence of its execution modes."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from lowbit.calibrate.stats import HessianStats
from lowbit.formats import IntegerFormat, QuantizedWeight, WeightFormat
from lowbit.models.architectures import UnsupportedModelError, architecture_of
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.solvers.base import Solver
from lowbit.solvers.gptq import GPTQ
from lowbit.solvers.rtn import RTN

FMT = IntegerFormat(bits=3, symmetric=False, group_size=32)


@dataclass
class Capture(Solver):
    """RTN that keeps the Hessian each layer was given, in solving order."""

    name: ClassVar[str] = "capture"
    needs_hessian: ClassVar[bool] = True
    hessians: list[torch.Tensor] = field(default_factory=list)

    def solve(self, weight: torch.Tensor, fmt: WeightFormat, stats: HessianStats | None) -> QuantizedWeight:
        self.hessians.append(stats.hessian.clone())
        return RTN().solve(weight, fmt)


def run(model, calibration, solver, **kwargs) -> dict[str, QuantizedWeight]:
    """Quantize `model` with `solver` on every block linear; the results in solving order."""
    results: dict[str, QuantizedWeight] = {}

    def on_quantized(name, qweight):
        results[name] = qweight

    SequentialQuantizer(
        model, architecture_of(model), lambda name, linear: (FMT, solver), on_quantized=on_quantized, **kwargs
    ).run(calibration)
    return results


def layer_input(model, ids, module_name):
    """The input that `module_name` receives when `model` runs on `ids`."""
    seen = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    return 2.0 / x.shape[0] * x.T.double() @ x.double()


@pytest.fixture
def calibration():
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


def test_true_sequential_calibrates_each_group_on_quantized_inputs(tiny_model, calibration):
    reference = copy.deepcopy(tiny_model)
    solver = Capture()
    results = run(tiny_model, calibration, solver)
    order = list(results)
    hessians = dict(zip(order, solver.hessians))

    # Rebuild what each layer should have seen: the reference model with every layer solved
    # *before* it (in execution order) replaced by its quantized weight.
    for position, name in enumerate(order):
        model = copy.deepcopy(reference)
        for earlier in order[:position]:
            module = model.get_submodule(earlier)
            module.weight.data = results[earlier].dequantize()
        expected = layer_input(model, calibration, name).float()
        assert torch.allclose(hessians[name], expected, rtol=1e-4, atol=1e-5), name


def test_single_pass_and_batched_passes_agree(calibration):
    from tests.conftest import tiny_llama

    single = run(tiny_llama(), calibration, GPTQ())
    batched = run(tiny_llama(), calibration, GPTQ(), batch_size=2)
    assert single.keys() == batched.keys()
    for name in single:
        same = (single[name].codes == batched[name].codes).float().mean()
        assert same > 0.99, name


def test_not_true_sequential_uses_original_block_inputs(tiny_model, calibration):
    reference = copy.deepcopy(tiny_model)
    solver = Capture()
    results = run(tiny_model, calibration, solver, true_sequential=False)
    order = list(results)
    captured = dict(enumerate(solver.hessians))
    # In block 0 every layer sees the unquantized model's activations.
    for position, name in enumerate(order):
        if not name.startswith("model.layers.0."):
            continue
        expected = layer_input(reference, calibration, name).float()
        assert torch.allclose(captured[position], expected, rtol=1e-4, atol=1e-5), name


def test_data_free_solver_needs_no_calibration(tiny_model):
    original = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if n.endswith("_proj")}
    results = run(tiny_model, None, RTN())
    assert len(results) == 14  # 7 linears x 2 blocks; lm_head is not in a block
    for name, weight in original.items():
        expected = RTN().solve(weight, FMT).dequantize()
        assert torch.equal(tiny_model.get_submodule(name).weight, expected)


def test_hessian_solver_without_calibration_is_refused(tiny_model):
    with pytest.raises(ValueError, match="calibration"):
        run(tiny_model, None, GPTQ())


def test_unsupported_architecture_lists_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama"):
        architecture_of(model)


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "own-head"])
def test_capture_moves_only_what_runs_before_the_first_block_and_copies_nothing_back(tie):
    """An untied output head stays put (calibration stops at the first block); a tied one moves with
    the embedding; on exit every tensor has its original storage back (checked on a GPU if present)."""
    from conftest import tiny_llama

    from lowbit.pipeline.sequential import _outside_blocks_on

    model = tiny_llama(tie=tie)
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    context = _outside_blocks_on(model, architecture_of(model), device)
    moving = {id(t) for t in context.tensors}
    assert id(embedding) in moving and id(model.model.norm.weight) in moving
    assert (id(head) in moving) == tie
    assert not moving & {id(p) for p in model.model.layers.parameters()}
    before = {name: t.data_ptr() for name, t in model.named_parameters()}
    with context:
        assert embedding.device.type == device.type
    assert {name: t.data_ptr() for name, t in model.named_parameters()} == before


def test_the_output_head_is_calibrated_on_the_final_norm_of_the_quantized_blocks(calibration):
    """quantize_head: after the blocks, lm_head is solved on the final norm of the quantized model's
    last hidden states; tied to the embedding (tiny_llama ties them), it is untied first, so the
    embedding stays exact. Without quantize_head the head is left alone."""
    from tests.conftest import tiny_llama

    untouched = tiny_llama()
    assert "lm_head" not in run(untouched, calibration, RTN())
    assert untouched.lm_head.weight is untouched.model.embed_tokens.weight

    model = tiny_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    reference = copy.deepcopy(model)
    solver = Capture()
    results = run(model, calibration, solver, quantize_head=True)
    assert list(results)[-1] == "lm_head" and len(results) == 15
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(model.lm_head.weight, results["lm_head"].dequantize())
    for name, qweight in results.items():
        if name != "lm_head":
            reference.get_submodule(name).weight.data = qweight.dequantize()
    expected = layer_input(reference, calibration, "lm_head").float()
    torch.testing.assert_close(solver.hessians[-1], expected, rtol=1e-4, atol=1e-5)
