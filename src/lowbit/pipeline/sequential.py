"""Block-by-block quantization: the executor that walks a model and calls solvers.

Calibration inputs are embedded once and captured at the first block. Each block is then moved to
the compute device, its linears are solved group by group while calibration activations flow
through it, and its *quantized* outputs become the next block's inputs, so every block is
calibrated on what the quantized model will really feed it. Only one block and the activations
are on the device at a time.

Within a block, groups of linears that read the same input (q/k/v; gate/up) share one Hessian,
and are solved as one row-stacked matrix when their solver and format allow it.
With `true_sequential`, a group is solved before the groups after it see their inputs, so o_proj
is calibrated on the output of the already quantized q/k/v. When all calibration samples fit in
one forward pass this costs nothing extra: each group is solved inside a pre-forward hook, the
moment its input is known, and the same pass carries on with the quantized weights and produces
the block's outputs. Otherwise one pass per group accumulates statistics over the batches (each
pass stops right after the group's input is seen), then a last pass produces the outputs.

Block transforms (AWQ scales) run first, on the block's full-precision weights: one extra pass
collects every group's input statistics, the transforms rewrite the block, and the passes above
then see the rewritten block, so solvers are calibrated on the rescaled inputs.

With an activation format (W8A8), each linear rounds its input to it from the moment its group is
solved (modules.input_quant): later groups, and the next block, see the outputs of a block whose
weights *and* inputs are quantized. A group is solved on its own unrounded inputs; static scales
are calibrated on those same inputs (max |x| over every calibration token that reaches it).

With `quantize_head`, the output head follows the last block the same way, calibrated on the final
norm of the quantized blocks' outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibrate.stats import ChannelMagnitude, ChannelMaximum, HessianStats
from lowbit.formats.activation import ActivationFormat
from lowbit.formats.base import QuantizedWeight, WeightFormat
from lowbit.models.architectures import Architecture, untie_head
from lowbit.modules.input_quant import input_quantizer, quantize_inputs
from lowbit.pipeline.block_memory import on_device
from lowbit.pipeline.shortcuts import ParentShortcut, free_memory_bytes, shortcuts_for
from lowbit.solvers.base import Solver
from lowbit.transforms.base import MAX_INPUT_SAMPLES, BlockTransform, SharedInput
from lowbit.transforms.online import has_online_hadamard

LayerPlan = Callable[[str, nn.Linear], "tuple[WeightFormat, Solver] | None"]
"""Maps a linear's full name to its format and solver, or None to leave it unquantized."""

QuantizedCallback = Callable[[str, QuantizedWeight], None]

KeepOutput = Callable[[torch.Tensor], torch.Tensor]
"""Stores one batch's block output (e.g. spilled to disk) and returns the tensor to read it back from."""


class BlockHooks(Protocol):
    """Called around each block: streaming loads its weights first, resume commits it afterwards."""

    def before_block(self, index: int, block: nn.Module) -> None:
        """Before the block moves to the device (its weights may still be on the meta device)."""

    def after_block(self, index: int, block: nn.Module, outputs: list[torch.Tensor] | None) -> None:
        """After every linear of the block is solved; `outputs` are the next block's inputs (None
        without calibration data)."""


@dataclass
class _Job:
    name: str
    linear: nn.Linear
    fmt: WeightFormat
    solver: Solver


@dataclass
class _Group:
    """Linears of one block that read the same input, with their shared statistics."""

    jobs: list[_Job]
    stats: HessianStats | None = None
    input_range: ChannelMaximum | None = None
    """Largest |input| per channel, for a static activation scale; None otherwise."""
    solved: bool = False
    seen_this_batch: bool = False

    @property
    def needs_hessian(self) -> bool:
        return any(job.solver.needs_hessian for job in self.jobs)


class _StopForward(Exception):
    """Raised from a hook to end a block's forward pass once the needed input has been seen."""


class _HeadReader(nn.Module):
    """The final norm and the output head as a block: hidden states in, the head's output out."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.head(self.norm(hidden))


@dataclass
class _BlockInputs:
    """Captured inputs of the current block, one entry per calibration batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class SequentialQuantizer:
    """Quantizes a causal LM in place, block by block, and reports every quantized weight."""

    def __init__(
        self,
        model: nn.Module,
        architecture: Architecture,
        plan: LayerPlan,
        device: torch.device | str = "cpu",
        batch_size: int | None = None,
        true_sequential: bool = True,
        on_quantized: QuantizedCallback | None = None,
        activations_on_device: bool = False,
        transforms: Sequence[BlockTransform] = (),
        hooks: Sequence[BlockHooks] = (),
        keep_output: KeepOutput | None = None,
        reduce_stats: Callable[[HessianStats], None] | None = None,
        activations: ActivationFormat | None = None,
        use_shortcuts: bool = True,
        quantize_head: bool = False,
    ) -> None:
        """`batch_size` calibration samples go through a block per forward (None: all at once).

        `activations_on_device` keeps the calibration activations on `device` between blocks
        instead of in CPU memory: no host round trip per forward pass, at the cost of two copies
        of them (a block's inputs and outputs) in device memory. `transforms` rewrite each block,
        in order, before its linears are solved. `activations` is the format every quantized
        linear's input is rounded to once its weights are solved (None: weight-only).
        `use_shortcuts` lets true-sequential passes over several batches answer a sub-module that
        ends in an already solved linear from that linear's recorded inputs (pipeline/shortcuts.py);
        off, every pass runs the whole block (the same results, for timing the difference).
        `quantize_head`: after the blocks, ask the plan for the output head too (`_quantize_head`).
        """
        self.transforms = list(transforms)
        self.model = model
        self.architecture = architecture
        self.plan = plan
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.true_sequential = true_sequential
        self.on_quantized = on_quantized or (lambda name, qweight: None)
        self.activations_on_device = activations_on_device
        self.hooks = tuple(hooks)
        self.keep_output = keep_output
        self.reduce_stats = reduce_stats  # sums statistics across processes (pipeline.distributed)
        self.activations = activations
        self.use_shortcuts = use_shortcuts
        self.quantize_head = quantize_head

    @torch.no_grad()
    def run(
        self, calibration: torch.Tensor | None, start_block: int = 0, start_hidden: list[torch.Tensor] | None = None
    ) -> None:
        """Quantize every planned linear; `calibration` is [samples, seq_len] token ids or None.

        A resumed run starts at `start_block` with that block's saved inputs `start_hidden` (one
        tensor per batch); the other inputs of a block (rotary tables, masks) are recomputed from
        the calibration tokens, which is exact and cheap.
        """
        blocks = self.architecture.block_list(self.model)
        inputs = self._capture_first_block_inputs(calibration) if calibration is not None else None
        if inputs is not None and start_hidden is not None:
            if len(start_hidden) != len(inputs.hidden):
                raise ValueError(f"saved inputs hold {len(start_hidden)} batches, the calibration has {len(inputs.hidden)}")
            inputs.hidden = list(start_hidden)
        progress = tqdm(blocks, desc="quantizing blocks", unit="block", initial=start_block, total=len(blocks))
        for index in range(start_block, len(blocks)):
            block = blocks[index]
            for hook in self.hooks:
                hook.before_block(index, block)
            groups = self._groups_of(block, f"{self.architecture.blocks}.{index}")
            static = self.activations is not None and not self.activations.dynamic
            needs_data = self.transforms or static or any(group.needs_hessian for group in groups)
            if needs_data and inputs is None:
                raise ValueError("the chosen method needs calibration data; pass --calib")
            with on_device(block, self.device):
                if inputs is None:
                    for group in groups:
                        self._solve(group)
                else:
                    for transform in self.transforms:
                        transform.apply(self._shared_inputs(block, f"{self.architecture.blocks}.{index}", inputs))
                    inputs = self._quantize_block(block, groups, inputs)
            for hook in self.hooks:
                hook.after_block(index, block, None if inputs is None else inputs.hidden)
            progress.update()
        progress.close()
        if self.quantize_head:
            self._quantize_head(inputs)

    def _quantize_head(self, inputs: _BlockInputs | None) -> None:
        """The output head, where the plan quantizes it, calibrated on the final norm of the last
        (quantized) block's outputs: one more "block" made of that norm and the head, whose
        forward stops at the head's input, so the logits are never computed. A head tied to the
        input embedding gets a weight of its own first, so the embedding stays exact."""
        name = self.architecture.head
        head = self.model.get_submodule(name)
        choice = self.plan(name, head)
        if choice is None:
            return
        untie_head(self.model)  # a new weight on the same module
        group = _Group([_Job(name, head, *choice)])
        reader = _HeadReader(self.model.get_submodule(self.architecture.final_norm), head)
        with on_device(reader, self.device):
            if inputs is None:
                self._solve(group)
            else:
                self._start_statistics([group])
                self._forward_all(reader, inputs, [group], stop_after_input=True)
                self._solve(group)

    def _groups_of(self, block: nn.Module, prefix: str) -> list[_Group]:
        groups = []
        for names in self.architecture.linear_groups:
            jobs = []
            for name in names:
                linear = block.get_submodule(name)
                choice = self.plan(f"{prefix}.{name}", linear)
                if choice is not None:
                    jobs.append(_Job(f"{prefix}.{name}", linear, *choice))
            if jobs:
                groups.append(_Group(jobs))
        return groups

    def _shared_inputs(self, block: nn.Module, prefix: str, inputs: _BlockInputs) -> list[SharedInput]:
        """Every linear group of the block with its input statistics from one full-precision pass."""
        architecture = self.architecture
        members = [[block.get_submodule(name) for name in names] for names in architecture.linear_groups]
        hessians = [HessianStats(linears[0].in_features, device=self.device) for linears in members]
        magnitudes = [ChannelMagnitude(linears[0].in_features, device=self.device) for linears in members]
        maxima = [ChannelMaximum(linears[0].in_features, device=self.device) for linears in members]
        keep_samples = any(transform.needs_input_samples for transform in self.transforms)
        samples: list[list[torch.Tensor]] = [[] for _ in members]
        tokens = sum(hidden.shape[:-1].numel() for hidden in inputs.hidden)
        stride = -(-tokens // MAX_INPUT_SAMPLES)
        seen: set[int] = set()

        def make_hook(number: int) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                if number not in seen:  # the first member called sees the shared input
                    seen.add(number)
                    hessians[number].add(args[0])
                    magnitudes[number].add(args[0])
                    maxima[number].add(args[0])
                    if keep_samples:
                        rows = args[0].reshape(-1, args[0].shape[-1])
                        samples[number].append(rows[::stride].float())

            return hook

        handles = [
            linear.register_forward_pre_hook(make_hook(number))
            for number, linears in enumerate(members)
            for linear in linears
        ]
        try:
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                seen.clear()
                block(hidden.to(self.device), **_to_device(kwargs, self.device))
        finally:
            for handle in handles:
                handle.remove()
        groups = []
        for number, (names, source) in enumerate(zip(architecture.linear_groups, architecture.input_sources)):
            choices = [self.plan(f"{prefix}.{name}", linear) for name, linear in zip(names, members[number])]
            quantized = any(choice is not None for choice in choices)
            groups.append(SharedInput(
                names=names,
                members=members[number],
                formats=[None if choice is None else choice[0] for choice in choices],
                # An online Hadamard sits between the source and the group: no channel scale passes it.
                source=None if source is None or any(map(has_online_hadamard, members[number]))
                else block.get_submodule(source),
                hessian=hessians[number].hessian,
                mean_abs=magnitudes[number].mean,
                max_abs=maxima[number].max_abs,
                activations=self.activations if quantized else None,
                samples=torch.cat(samples[number]) if keep_samples else None,
            ))
        return groups

    def _start_statistics(self, groups: list[_Group]) -> None:
        """Empty input statistics for each group: its Hessian where a solver needs one, its input
        range where activations get static scales."""
        static = self.activations is not None and not self.activations.dynamic
        for group in groups:
            if group.needs_hessian:
                group.stats = HessianStats(group.jobs[0].linear.in_features, device=self.device)
            if static:
                group.input_range = ChannelMaximum(group.jobs[0].linear.in_features, device=self.device)

    def _quantize_block(self, block: nn.Module, groups: list[_Group], inputs: _BlockInputs) -> _BlockInputs:
        self._start_statistics(groups)
        if len(inputs.hidden) == 1 and self.true_sequential:
            return self._forward_all(block, inputs, groups, solve_in_hook=True)
        if not self.true_sequential:
            self._forward_all(block, inputs, groups)
            for group in groups:
                self._solve(group)
            return self._forward_all(block, inputs, [])
        shortcuts = self._shortcuts(block, inputs)
        for group in groups:
            recording = [shortcut for shortcut in shortcuts if any(job.linear is shortcut.linear for job in group.jobs)]
            for shortcut in recording:
                shortcut.start_recording()
            self._forward_all(block, inputs, [group], stop_after_input=True, shortcuts=shortcuts)
            self._solve(group)
            for shortcut in recording:
                shortcut.stop_recording(len(inputs.hidden))
        return self._forward_all(block, inputs, [], shortcuts=shortcuts)

    def _shortcuts(self, block: nn.Module, inputs: _BlockInputs) -> list[ParentShortcut]:
        """Shortcuts through o_proj's and down_proj's parents (pipeline/shortcuts.py), kept where
        the block's inputs are when that is the compute device (no copies) and activations are not
        spilled to disk; at most a quarter of the free memory each."""
        store = inputs.hidden[0].device
        compute = torch.empty(0, device=self.device).device  # "cuda" names the current index, as store does
        if not self.use_shortcuts or self.keep_output is not None or store != compute:
            return []
        budget = free_memory_bytes(store)
        return list(shortcuts_for(block, self.architecture.linear_groups, store,
                                  None if budget is None else budget // 4).values())

    def _forward_all(
        self,
        block: nn.Module,
        inputs: _BlockInputs,
        groups: list[_Group],
        solve_in_hook: bool = False,
        stop_after_input: bool = False,
        shortcuts: Sequence[ParentShortcut] = (),
    ) -> _BlockInputs:
        """Run every calibration batch through `block` with statistics hooks on `groups`' inputs.

        Every member of a group carries the hook, so whichever the block calls first sees the
        shared input (once per batch) before any member computes with its weights. Returns the
        block's outputs, which are only meaningful once every group has been solved.
        """

        def make_hook(group: _Group) -> Callable:
            def hook(module: nn.Module, args: tuple) -> tuple | None:
                if group.seen_this_batch:
                    return None
                group.seen_this_batch = True
                if not group.solved:
                    if group.stats is not None:
                        group.stats.add(args[0])
                    if group.input_range is not None:
                        group.input_range.add(args[0])
                if stop_after_input:
                    raise _StopForward
                if solve_in_hook and not group.solved:
                    self._solve(group)
                    # The input quantizer attached just now is not among this call's hooks.
                    quantizer = input_quantizer(module)
                    return None if quantizer is None else quantizer(module, args)
                return None

            return hook

        handles = [
            job.linear.register_forward_pre_hook(make_hook(group)) for group in groups for job in group.jobs
        ]
        outputs = _BlockInputs(hidden=[], kwargs=inputs.kwargs)
        try:
            for number, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                for group in groups:
                    group.seen_this_batch = False
                try:
                    with ExitStack() as stack:
                        for shortcut in shortcuts:
                            stack.enter_context(shortcut.for_batch(number))
                        out = block(hidden.to(self.device), **_to_device(kwargs, self.device))
                except _StopForward:
                    continue
                out = out[0] if isinstance(out, tuple) else out
                out = out.to(hidden.device)
                outputs.hidden.append(out if self.keep_output is None else self.keep_output(out))
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def _solve(self, group: _Group) -> None:
        if group.solved:
            return
        if group.stats is not None and self.reduce_stats is not None:
            self.reduce_stats(group.stats)
        if self.activations is not None:  # before on_quantized, which may read the input quantizer
            scale = None
            if group.input_range is not None:
                scale = self.activations.static_scale(group.input_range.max_abs.max())
            for job in group.jobs:
                quantize_inputs(job.linear, self.activations, scale)
        for stack in _stacks(group.jobs):
            weights = [job.linear.weight.data for job in stack]
            with _solver_threads(self.device):
                stacked = torch.cat([w.float() for w in weights]) if len(stack) > 1 else weights[0].float()
                qweight = stack[0].solver.solve(stacked, stack[0].fmt, group.stats)
            pieces = qweight.split_rows([w.shape[0] for w in weights]) if len(stack) > 1 else [qweight]
            for job, weight, piece in zip(stack, weights, pieces):
                job.linear.weight.data = piece.dequantize().to(dtype=weight.dtype, device=weight.device)
                self.on_quantized(job.name, _to_cpu(piece))
        group.solved = True
        group.stats = None
        group.input_range = None

    def _capture_first_block_inputs(self, calibration: torch.Tensor) -> _BlockInputs:
        """Embed the calibration batches once and keep what the first block receives."""
        first = self.architecture.block_list(self.model)[0]
        captured = _BlockInputs(hidden=[])

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.hidden.append(hidden if self.activations_on_device else hidden.to("cpu"))
            captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _StopForward

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with _outside_blocks_on(self.model, self.architecture, self.device):
                for batch in _batches(calibration, self.batch_size):
                    try:
                        self.model(input_ids=batch.to(self.device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        return captured


def _stacks(jobs: list[_Job]) -> list[list[_Job]]:
    """Split a group's jobs into runs that one solver call can handle stacked row-wise.

    Jobs stack when they share the solver and an equal format and both treat rows independently;
    e.g. q/k/v under one GPTQ recipe become one solve with one factorisation of their Hessian.
    """
    stacks: list[list[_Job]] = []
    for job in jobs:
        last = stacks[-1][-1] if stacks else None
        if (
            last is not None
            and job.solver is last.solver
            and job.fmt == last.fmt
            and job.solver.rows_independent
            and job.fmt.rows_independent
        ):
            stacks[-1].append(job)
        else:
            stacks.append([job])
    return stacks


@contextmanager
def _solver_threads(device: torch.device) -> Iterator[None]:
    """Solve on one CPU thread: solvers are long chains of small ops, which a second thread slows
    down (several times over when the other core is busy), while the big matmuls of the forward
    passes keep every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(ids: torch.Tensor, batch_size: int | None) -> Iterator[torch.Tensor]:
    step = batch_size or ids.shape[0]
    for start in range(0, ids.shape[0], step):
        yield ids[start : start + step]


class _outside_blocks_on:
    """Context manager: what runs before the first block (embeddings, rotary tables) on `device`.

    Calibration stops at the first block, so an output head of its own (1 GB for Llama-3-8B's 128k
    vocabulary) stays where it is; a head tied to the input embedding moves with it. The tensors are
    for reading only: on exit each gets its original data back, without a copy back.
    """

    def __init__(self, model: nn.Module, architecture: Architecture, device: torch.device) -> None:
        blocks = architecture.block_list(model)
        skipped = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head is not None:
            shared = set() if inputs is None else {id(t) for t in inputs.parameters()}
            skipped |= {id(t) for t in head.parameters() if id(t) not in shared}
        # Tensors still on the meta device (a streamed model's head) are not needed for calibration.
        self.tensors = [
            t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in skipped and not t.is_meta
        ]
        self.device = device
        self.original: list[torch.Tensor] = []

    def __enter__(self) -> None:
        self.original = [tensor.data for tensor in self.tensors]
        for tensor in self.tensors:
            tensor.data = tensor.data.to(self.device)

    def __exit__(self, *exc: object) -> None:
        for tensor, data in zip(self.tensors, self.original):
            tensor.data = data
        self.original = []


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _to_cpu(qweight: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(
        format=qweight.format,
        codes=qweight.codes.cpu(),
        scale=qweight.scale.cpu(),
        zero=None if qweight.zero is None else qweight.zero.cpu(),
        group_index=qweight.group_index.cpu(),
        metadata=qweight.metadata,
        row_metadata={key: values.cpu() for key, values in qweight.row_metadata.items()},
        sparse=None if qweight.sparse is None else qweight.sparse.cpu(),
        lowrank=None if qweight.lowrank is None else qweight.lowrank.cpu(),
    )
