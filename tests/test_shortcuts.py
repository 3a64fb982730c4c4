"""Shortcuts through sub-modules in true-sequential passes: the same results, less recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.formats import IntegerFormat
from lowbit.formats.activation import ActivationFormat
from lowbit.models.architectures import architecture_of
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.pipeline.shortcuts import ParentShortcut
from lowbit.solvers.gptq import GPTQ
from tests.conftest import tiny_llama

FMT = IntegerFormat(bits=3, symmetric=False, group_size=32)


def quantize_counting_calls(use_shortcuts: bool, watched: tuple[str, ...], activations=None, device="cpu"):
    """GPTQ over a tiny Llama in three calibration batches; the quantized weights, the block
    outputs handed to the second block, and how often each watched module of block 0 ran."""
    model = tiny_llama()
    calibration = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    calls = dict.fromkeys(watched, 0)
    for name in watched:
        def count(module, args, output, name=name):
            calls[name] += 1
        model.get_submodule(f"model.layers.0.{name}").register_forward_hook(count)
    outputs = []

    class KeepOutputs:
        def before_block(self, index, block):
            pass

        def after_block(self, index, block, hidden):
            outputs.append([h.clone() for h in hidden])

    results = {}
    SequentialQuantizer(model, architecture_of(model), lambda name, linear: (FMT, GPTQ()), batch_size=2, device=device,
                        activations_on_device=device != "cpu",
                        on_quantized=lambda name, qweight: results.setdefault(name, qweight),
                        hooks=[KeepOutputs()], use_shortcuts=use_shortcuts, activations=activations).run(calibration)
    return results, outputs, calls


@pytest.mark.parametrize("activations", [None, "a8-static"], ids=["weight-only", "static-int8-inputs"])
def test_shortcuts_give_the_same_weights_and_outputs_and_skip_the_recomputation(activations):
    """Also with inputs rounded by input quantizers, which run in a shortened parent too (the
    linear's pre-hooks), calibrated on the same inputs."""
    fmt = None if activations is None else ActivationFormat(bits=8, dynamic=False, granularity="tensor")
    watched = ("self_attn.q_proj", "self_attn", "mlp.gate_proj", "mlp")
    plain, plain_outputs, plain_calls = quantize_counting_calls(False, watched, fmt)
    short, short_outputs, short_calls = quantize_counting_calls(True, watched, fmt)
    assert plain.keys() == short.keys()
    for name in plain:
        assert torch.equal(plain[name].codes, short[name].codes), name
        assert torch.equal(plain[name].scale, short[name].scale), name
    for plain_block, short_block in zip(plain_outputs, short_outputs, strict=True):
        for a, b in zip(plain_block, short_block, strict=True):
            assert torch.equal(a, b)
    batches = 3
    # Without: q_proj runs in the o_proj, gate/up, down and output passes; with: in o_proj's, and
    # once more in the next pass, the call that checks self_attn returns o_proj's output.
    assert plain_calls["self_attn.q_proj"] == 4 * batches and short_calls["self_attn.q_proj"] == batches + 1
    # gate_proj runs in the down and output passes; the output pass answers the MLP from down's inputs.
    assert plain_calls["mlp.gate_proj"] == 2 * batches and short_calls["mlp.gate_proj"] == batches + 1
    # The sub-modules are still called (answered from the recorded inputs), as often as before.
    assert short_calls["self_attn"] == plain_calls["self_attn"] and short_calls["mlp"] == plain_calls["mlp"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shortcuts_on_the_gpu_give_the_same_weights():
    """On the GPU, with the activations kept there (where the shortcuts keep their inputs)."""
    plain, _, _ = quantize_counting_calls(False, (), device="cuda")
    short, _, calls = quantize_counting_calls(True, ("self_attn.q_proj",), device="cuda")
    assert all(torch.equal(plain[name].codes, short[name].codes) for name in plain)
    assert calls["self_attn.q_proj"] == 4  # three batches in o_proj's pass, one check after


class _Returns(nn.Module):
    """A parent whose last operation is `linear`, then `after` of its output."""

    def __init__(self, after):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.linear = nn.Linear(4, 4)
        self.after = after

    def forward(self, x):
        return self.after(self.linear(torch.relu(self.inner(x))))


def _through(parent: nn.Module, shortcut: ParentShortcut, batches: list[torch.Tensor]) -> list:
    """The shortcut's whole life over `batches`: the recording pass, then two ordinary passes."""
    shortcut.start_recording()
    for number, x in enumerate(batches):
        with shortcut.for_batch(number):
            parent(x)
    shortcut.stop_recording(len(batches))
    outputs = []
    for _ in range(2):
        for number, x in enumerate(batches):
            with shortcut.for_batch(number):
                outputs.append(parent(x))
    return outputs


def test_a_parent_is_shortened_only_when_it_returns_the_linears_own_output():
    batches = [torch.randn(3, 4) for _ in range(2)]
    for after, shortened in ((lambda y: y, True), (lambda y: (y, None), True), (lambda y: y + 1, False),
                             (lambda y: (y, y.sum()), False)):
        parent = _Returns(after)
        shortcut = ParentShortcut(parent, parent.linear, torch.device("cpu"))
        calls = []
        parent.inner.register_forward_hook(lambda *args: calls.append(1))
        outputs = _through(parent, shortcut, batches)
        assert shortcut.active is shortened
        # Recording pass and verifying call always run the parent; an active shortcut skips `inner` after.
        assert len(calls) == (len(batches) + 1 if shortened else 3 * len(batches))
        expected = [parent(x) for x in batches] * 2
        for got, want in zip(outputs, expected, strict=True):
            got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            assert all(g is w or torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert "forward" not in parent.__dict__  # the class's forward is back


def test_inputs_over_the_budget_are_not_kept():
    parent = _Returns(lambda y: y)
    shortcut = ParentShortcut(parent, parent.linear, torch.device("cpu"), budget_bytes=3 * 4 * 4)  # one batch
    _through(parent, shortcut, [torch.randn(3, 4) for _ in range(2)])
    assert not shortcut.active and not shortcut.inputs
