"""Shortcuts through a block's sub-modules that true-sequential passes would recompute unchanged.

With several calibration batches, true-sequential quantization runs a block once per group of
linears (each pass stops at the group's input) and once more for the block's outputs. Each of
those passes recomputes the attention from the start, although once o_proj's pass has run, q/k/v
are quantized and what self_attn returns changes only through o_proj: it is o_proj applied to the
input o_proj saw in its own pass. A `ParentShortcut` keeps that input per batch and answers the
parent's later calls with the linear applied to it: the gate/up, down and output passes skip the
q/k/v projections and the attention, the output pass skips gate/up (the MLP as down_proj of its
recorded input). About half of the forward work of a Llama block's five passes.

A parent is trusted only after one real call returned the linear's own output tensor (the same
object: the linear is the parent's last operation) with nothing else but None beside it; any other
parent keeps being run for real. The shortcut then computes exactly what the parent would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum, auto

import torch
from torch import nn


class _State(Enum):
    WAITING = auto()  # the linear's group has not had its pass yet
    RECORDING = auto()  # the linear's own pass: keep its input per batch
    UNVERIFIED = auto()  # inputs kept; the next real call of the parent checks its output
    ACTIVE = auto()  # the parent's calls are answered from the kept inputs
    OFF = auto()  # the parent returns more than the linear's output, or the inputs exceed the budget: run it


class ParentShortcut:
    """Recomputes `parent` (a block's sub-module whose last operation is `linear`) as `linear`
    applied to the input `linear` saw in its own true-sequential pass.

    `store` is the device the kept inputs live on (where the block's inputs are kept, so keeping
    them costs no copies); `budget_bytes`, if given, is the most they may take: a larger set of
    inputs is not kept and the parent runs for real.
    """

    def __init__(self, parent: nn.Module, linear: nn.Linear, store: torch.device, budget_bytes: int | None = None):
        self.parent = parent
        self.linear = linear
        self.store = store
        self.budget_bytes = budget_bytes
        self.state = _State.WAITING
        self.inputs: dict[int, torch.Tensor] = {}
        self.beside: tuple | None = None  # what the parent returns beside the linear's output (all None)

    @property
    def active(self) -> bool:
        return self.state is _State.ACTIVE

    def start_recording(self) -> None:
        """The linear's own pass begins: every batch's input to it is kept."""
        self.state = _State.RECORDING

    def stop_recording(self, batches: int) -> None:
        """The linear's pass is over and it is solved; the parent may be shortened from now on."""
        complete = len(self.inputs) == batches
        self.state = _State.UNVERIFIED if complete else _State.OFF
        if not complete:
            self.inputs.clear()

    @contextmanager
    def for_batch(self, batch: int) -> Iterator[None]:
        """Around one call of the block on calibration batch `batch`."""
        if self.state is _State.RECORDING:
            handle = self.linear.register_forward_pre_hook(self._recorder(batch), prepend=True)
            try:
                yield
            finally:
                handle.remove()
        elif self.state is _State.UNVERIFIED:
            with self._verifying():
                yield
        elif self.state is _State.ACTIVE:
            with self._answering(batch):
                yield
        else:
            yield

    def _recorder(self, batch: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if batch in self.inputs or self.state is not _State.RECORDING:
                return
            kept = args[0].detach().to(self.store)
            held = sum(t.numel() * t.element_size() for t in self.inputs.values())
            if self.budget_bytes is not None and held + kept.numel() * kept.element_size() > self.budget_bytes:
                self.state, self.inputs = _State.OFF, {}
                return
            self.inputs[batch] = kept

        return hook

    @contextmanager
    def _verifying(self) -> Iterator[None]:
        produced: list[torch.Tensor] = []

        def linear_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            produced.append(output)

        def parent_output(module: nn.Module, args: tuple, output) -> None:
            head, beside = (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)
            if produced and head is produced[-1] and all(item is None for item in beside or ()):
                self.state, self.beside = _State.ACTIVE, beside
            else:
                self.state, self.inputs = _State.OFF, {}

        handles = [self.linear.register_forward_hook(linear_output), self.parent.register_forward_hook(parent_output)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _answering(self, batch: int) -> Iterator[None]:
        kept = self.inputs[batch]
        device = self.linear.weight.device

        def forward(*args, **kwargs):
            output = self.linear(kept.to(device))
            return output if self.beside is None else (output, *self.beside)

        replaced = self.parent.__dict__.get("forward")  # e.g. accelerate's offloading wrapper
        self.parent.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            if replaced is None:
                del self.parent.forward
            else:
                self.parent.forward = replaced


def shortcuts_for(block: nn.Module, linear_groups: Sequence[Sequence[str]], store: torch.device,
                  budget_bytes: int | None = None) -> dict[str, ParentShortcut]:
    """Name of a linear -> its shortcut, for every linear that is alone in its group, lives in a
    sub-module of the block, and is solved last of the groups inside that sub-module (so the
    sub-module does not change after its pass). `linear_groups` are in solving order, by names
    relative to the block."""
    shortcuts = {}
    for number, names in enumerate(linear_groups):
        if len(names) != 1 or "." not in names[0]:
            continue
        parent_name = names[0].rsplit(".", 1)[0]
        later_inside = any(name.startswith(parent_name + ".") for group in linear_groups[number + 1:] for name in group)
        if not later_inside:
            shortcuts[names[0]] = ParentShortcut(block.get_submodule(parent_name), block.get_submodule(names[0]),
                                                 store, budget_bytes)
    return shortcuts


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on `device`, counting what torch's CUDA allocator holds unused (None where it
    cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            import psutil  # installed with accelerate
        except ImportError:
            return None
        return psutil.virtual_memory().available
    return None
