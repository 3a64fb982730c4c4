"""Runs the cells of a grid on one model: quantize, measure, cache, one cell at a time.

The model is loaded, and the calibration and evaluation tokens prepared, once. The original's
log-probabilities on the evaluation windows are computed once (and only if some cell still has to
run) so each cell's KL divergence costs one forward pass of the quantized model. Every cell starts
from the same original weights, so cells differ only in what the grid varies. Each finished cell
is written to the cache before the next starts; a cell that fails is reported and not cached.
"""

from __future__ import annotations

import copy
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import lowbit
from lowbit.api import REFERENCE_BITS, SizeReport, resolve_device
from lowbit.calibrate.data import resolve_calibration, resolve_evaluation_text, tokenize_text
from lowbit.compare import lmeval
from lowbit.compare.cache import CellCache, cell_key, model_fingerprint, tensor_digest
from lowbit.compare.grid import Cell
from lowbit.compare.peers import PEERS, PeerJob
from lowbit.evaluate import ReferenceLogProbs, evaluate, windows_of
from lowbit.models.architectures import Architecture, architecture_of
from lowbit.models.loading import load_model
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.transforms.model import apply_model_transforms

CACHE_FOLDER = "cells"
PEER_FOLDER = "peers"
"""Per peer cell: the tool's log and its own report (its weights are deleted once loaded)."""
WORK_FOLDER = ".work"
"""Scratch space of one run (the original saved for peers), removed at the end."""


@dataclass
class CompareSettings:
    """Calibration, evaluation and runtime settings shared by every cell."""

    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    eval_data: str | None = None
    eval_seq_len: int = 2048
    eval_windows: int = 8
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None


@dataclass
class CompareResult:
    meta: dict[str, Any]
    original: dict[str, Any]
    cells: list[dict[str, Any]]


class _Context:
    """What every cell shares: the original model, tokens, reference log-probabilities, cache."""

    def __init__(self, source: str | None, settings: CompareSettings, out_dir: Path) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)  # before the model loads: a wrong --device fails at once
        self.loaded = load_model(source, settings.dtype)
        self.model: nn.Module = self.loaded.model
        self.architecture: Architecture = architecture_of(self.model)
        self.fingerprint = model_fingerprint(self.model)
        self.linear_names = [
            f"{self.architecture.blocks}.{index}.{name}"
            for index, _ in enumerate(self.architecture.block_list(self.model))
            for names in self.architecture.linear_groups for name in names
        ]
        self.total_parameters = sum(p.numel() for p in self.model.parameters())
        self.out_dir = out_dir
        self.cache = CellCache(out_dir / CACHE_FOLDER)
        self.work = out_dir / WORK_FOLDER
        self.calibration: torch.Tensor | None = None
        self.calibration_description = "none (data-free)"
        self._reference: ReferenceLogProbs | None = None
        self._saved_model: Path | None = None
        text, self.evaluation_description = resolve_evaluation_text(
            settings.eval_data, self.model, self.loaded.tokenizer, settings.seed)
        self.eval_tokens = tokenize_text(self.loaded.tokenizer, text)
        self.eval_windows = windows_of(self.eval_tokens, settings.eval_seq_len, settings.eval_windows)
        self.tasks: lmeval.TaskSuite | None = None

    def calibrate(self) -> None:
        s = self.settings
        self.calibration, self.calibration_description = resolve_calibration(
            s.calib, self.model, self.loaded.tokenizer, s.samples, s.seq_len, s.seed)

    @property
    def reference(self) -> ReferenceLogProbs:
        if self._reference is None:
            self._reference = ReferenceLogProbs(self.model.to(self.device), self.eval_tokens,
                                                self.settings.eval_seq_len, self.settings.eval_windows)
            self.model.to("cpu")
        return self._reference

    def saved_model(self) -> Path:
        """The original as a save_pretrained folder, for tools that load models themselves."""
        if self._saved_model is None:
            folder = self.work / "original-model"
            shutil.rmtree(folder, ignore_errors=True)
            self.model.save_pretrained(folder)
            self.loaded.tokenizer.save_pretrained(folder)
            self._saved_model = folder
        return self._saved_model

    def key(self, cell: Cell) -> str:
        s = self.settings
        if cell.recipe is not None:
            what: dict[str, Any] = {"tool": "lowbit", "recipe": cell.recipe.model_dump(), "version": lowbit.__version__}
            uses_calibration = cell.recipe.needs_calibration()
        else:
            peer = PEERS[cell.tool]()
            what = {"tool": cell.tool, "settings": peer.settings(cell.scheme)}
            uses_calibration = peer.needs_calibration
        if uses_calibration:
            what["calibration"] = tensor_digest(self.calibration) if self.calibration is not None else None
        return cell_key({
            **what,
            "model": self.fingerprint,
            "evaluation": {"windows": tensor_digest(self.eval_windows), "seq_len": s.eval_seq_len},
            "tasks": None if self.tasks is None else {"names": self.tasks.names, "limit": s.task_limit},
        })

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        s = self.settings
        result = evaluate(model, self.eval_tokens, seq_len=s.eval_seq_len, max_windows=s.eval_windows,
                          reference=self.reference, device=self.device)
        record: dict[str, Any] = {"perplexity": result.perplexity, "kl": result.kl, "eval_seconds": result.seconds}
        if self.tasks is not None:
            model.to(self.device)
            try:
                record["tasks"] = lmeval.run_tasks(self.tasks, model, self.loaded.tokenizer, s.task_limit)
            finally:
                model.to("cpu")
        return record

    def sizes(self, quantized_parameters: int, quantized_bits: float) -> dict[str, float]:
        other = self.total_parameters - quantized_parameters
        return {
            "bits_per_weight": quantized_bits / quantized_parameters,
            "quantized_parameters": quantized_parameters,
            "quantized_megabytes": quantized_bits / 8 / 1e6,
            "model_megabytes": (quantized_bits + other * REFERENCE_BITS) / 8 / 1e6,
        }


def describe_cell(cell: Cell) -> dict[str, Any]:
    """The identifying columns of a cell's row."""
    if cell.recipe is not None:
        r = cell.recipe
        return {"label": cell.label, "tool": "lowbit", "method": r.method, "bits": r.bits,
                "group_size": r.group_size, "symmetric": r.symmetric, "recipe": r.model_dump()}
    s = cell.scheme
    return {"label": cell.label, "tool": PEERS[cell.tool].tool, "method": cell.tool, "bits": s.bits,
            "group_size": s.group_size, "symmetric": s.symmetric, "recipe": None}


def _run_lowbit(context: _Context, cell: Cell) -> dict[str, Any]:
    model = copy.deepcopy(context.model)
    size = SizeReport()
    calibration = context.calibration if cell.recipe.needs_calibration() else None
    start = time.perf_counter()
    apply_model_transforms(cell.recipe.model_transforms(), model, context.architecture, cell.recipe.layer_formats(),
                           calibration)
    SequentialQuantizer(model, context.architecture, cell.recipe.plan(), device=context.device,
                        batch_size=context.settings.batch_size, transforms=cell.recipe.block_transforms(),
                        activations=cell.recipe.activations, quantize_head=True,
                        on_quantized=lambda name, qweight: size.add(qweight)).run(calibration)
    seconds = time.perf_counter() - start
    record = {"quantize_seconds": seconds, "version": f"lowbit {lowbit.__version__}",
              **context.sizes(size.parameters, size.bits)}
    record.update(context.evaluate(model))
    return record


def _run_peer(context: _Context, cell: Cell) -> dict[str, Any]:
    peer = PEERS[cell.tool]()
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", cell.label)
    job = PeerJob(model=context.model, tokenizer=context.loaded.tokenizer, scheme=cell.scheme,
                  linear_names=context.linear_names, calibration=context.calibration,
                  workdir=context.out_dir / PEER_FOLDER / slug, saved_model=context.saved_model)
    result = peer.quantize(job)
    model = copy.deepcopy(context.model)
    load_dense(model, result.state)
    quantized = sum(model.get_submodule(name).weight.numel() for name in context.linear_names)
    record = {"quantize_seconds": result.seconds, "version": f"{peer.tool} {result.version}",
              "peer_settings": result.settings, **context.sizes(quantized, result.bits_per_weight * quantized)}
    record.update(context.evaluate(model))
    return record


def load_dense(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a peer's tensors into `model`; every name and shape must match a tensor it has."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise ValueError(f"the peer returned a tensor the model does not have: {name}")
        if own[name].shape != tensor.shape:
            raise ValueError(f"the peer returned {name} with shape {tuple(tensor.shape)}, "
                             f"expected {tuple(own[name].shape)}")
        own[name].copy_(tensor.to(own[name].dtype))


def run_compare(source: str | None, cells: list[Cell], settings: CompareSettings, out_dir: Path,
                on_cell: Callable[[dict[str, Any]], None] | None = None,
                on_note: Callable[[str], None] | None = None) -> CompareResult:
    """Run (or read back) every cell; returns the original's row, the cells' rows and run metadata."""
    on_cell = on_cell or (lambda record: None)
    on_note = on_note or (lambda note: None)
    context = _Context(source, settings, out_dir)  # first: a wrong device or model leaves no folder behind
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        on_note(text)

    skipped: dict[int, str] = {}
    availability = {name: PEERS[name]().unavailable() for name in {c.tool for c in cells if c.recipe is None}}
    for name, reason in availability.items():
        if reason:
            note(f"peer {name} skipped: {reason}")
    for index, cell in enumerate(cells):
        if cell.recipe is None:
            reason = availability[cell.tool] or PEERS[cell.tool]().unsupported(cell.scheme)
            if reason:
                skipped[index] = reason
                if not availability[cell.tool]:
                    note(f"{cell.label} skipped: {reason}")
    runnable = [c for i, c in enumerate(cells) if i not in skipped]
    if any(c.recipe.needs_calibration() if c.recipe is not None else PEERS[c.tool].needs_calibration
           for c in runnable):
        context.calibrate()
    if settings.tasks:
        try:
            context.tasks = lmeval.prepare_tasks(settings.tasks)
        except lmeval.TasksUnavailable as err:
            note(f"tasks skipped: {err}")

    original = _original_row(context)
    records = []
    for index, cell in enumerate(cells):
        record = describe_cell(cell)
        if index in skipped:
            record.update(status="skipped", note=skipped[index])
        else:
            record["key"] = key = context.key(cell)
            cached = context.cache.get(key)
            if cached is not None:
                record.update({**cached, "status": "cached"})
            else:
                try:
                    record.update(_run_lowbit(context, cell) if cell.recipe is not None else _run_peer(context, cell))
                    record["status"] = "ok"
                    context.cache.put(key, record)
                except (ValueError, RuntimeError, OSError) as err:
                    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    record.update(status="failed", note=message)
        records.append(record)
        on_cell(record)
    shutil.rmtree(context.work, ignore_errors=True)
    return CompareResult(meta=_meta(context, notes), original=original, cells=records)


def _original_row(context: _Context) -> dict[str, Any]:
    key = cell_key({"tool": "original", "model": context.fingerprint,
                    "evaluation": tensor_digest(context.eval_windows), "seq_len": context.settings.eval_seq_len,
                    "tasks": None if context.tasks is None else context.tasks.names,
                    "task_limit": context.settings.task_limit})
    cached = context.cache.get(key)
    if cached is not None:
        return cached
    row = {"label": "original", "tool": "original", "method": "original", "bits": REFERENCE_BITS,
           "group_size": None, "symmetric": None, "bits_per_weight": float(REFERENCE_BITS),
           "model_megabytes": context.total_parameters * REFERENCE_BITS / 8 / 1e6, "quantize_seconds": 0.0,
           "original_dtype": str(next(context.model.parameters()).dtype).removeprefix("torch."),
           **context.evaluate(context.model), "key": key, "status": "ok"}
    row["kl"] = 0.0  # against itself; the measured value is float rounding only
    context.cache.put(key, row)
    return row


def _meta(context: _Context, notes: list[str]) -> dict[str, Any]:
    s = context.settings
    windows = context.eval_windows
    return {
        "model": context.loaded.name,
        "model_fingerprint": context.fingerprint,
        "calibration": context.calibration_description,
        "evaluation": f"{context.evaluation_description}: first {windows.shape[0]} non-overlapping windows of "
                      f"{s.eval_seq_len} tokens ({windows.shape[0] * (s.eval_seq_len - 1)} tokens scored)",
        "tasks": None if context.tasks is None else {"names": context.tasks.names, "limit": s.task_limit},
        "size_note": "bits/weight: quantized decoder linears, scales and zero points included; model MB: those "
                     f"plus every other tensor at {REFERENCE_BITS} bits",
        "notes": notes,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {context.device}",
        "versions": {"lowbit": lowbit.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
