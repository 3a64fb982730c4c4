"""The Python entry points behind `lowbit quantize` and `lowbit eval`.

Each step (load, calibrate, quantize, export, check, evaluate) lives in its own package; this module
only puts them in order, times them and returns the numbers the report prints.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.calibrate.data import resolve_calibration, resolve_evaluation_text, tokenize_text
from lowbit.evaluate import EvalResult, evaluate
from lowbit.export import CompressedTensorsWriter, ExportError, check_exportable, load_quantized
from lowbit.export.compressed_tensors import METADATA_FILE
from lowbit.formats.base import QuantizedWeight
from lowbit.models.architectures import Architecture, architecture_of
from lowbit.models.loading import LoadedModel, load_model
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe

REFERENCE_BITS = 16
"""Bits per weight of the unquantized model as it is usually stored and served (bf16/fp16)."""


@dataclass
class Settings:
    """How to calibrate and evaluate; defaults are the ones `lowbit quantize` uses."""

    calib: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    eval_data: str | None = None
    eval_seq_len: int = 2048
    eval_windows: int | None = 16
    device: str = "auto"
    batch_size: int | None = None
    true_sequential: bool = True
    dtype: str = "auto"


@dataclass
class SizeReport:
    """Storage of the quantized linear layers, scales and zero points included."""

    parameters: int = 0
    bits: float = 0.0

    def add(self, qweight: QuantizedWeight) -> None:
        count = qweight.codes.numel()
        self.parameters += count
        self.bits += qweight.bits_per_weight() * count

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.parameters if self.parameters else 0.0

    @property
    def megabytes(self) -> float:
        return self.bits / 8 / 1e6


@dataclass
class QuantizeReport:
    model: str
    recipe: Recipe
    out_dir: Path | None
    calibration: str
    evaluation: str | None = None
    evaluation_result: EvalResult | None = None
    """The quantized model's scores; its reference_perplexity is the original model's."""
    linear_size: SizeReport = field(default_factory=SizeReport)
    checkpoint_megabytes: float | None = None
    original_megabytes: float = 0.0
    export_max_abs_diff: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    quantized_model: nn.Module | None = field(default=None, repr=False)
    """The in-memory quantized model (dequantized weights), for callers of the Python API."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_plan(model: nn.Module, architecture: Architecture, recipe: Recipe, exporting: bool) -> int:
    """Validate every layer's format before any work starts; returns the number of layers planned."""
    plan = recipe.plan()
    planned = 0
    for index, block in enumerate(architecture.block_list(model)):
        for names in architecture.linear_groups:
            for name in names:
                full_name = f"{architecture.blocks}.{index}.{name}"
                linear = block.get_submodule(name)
                choice = plan(full_name, linear)
                if choice is None:
                    continue
                planned += 1
                problem = check_exportable(choice[0], linear.in_features, full_name) if exporting else None
                if problem:
                    raise ExportError(problem)
    if planned == 0:
        raise ValueError("the recipe's ignore list leaves no layer to quantize")
    regrouped = any(r.method_options.get("act_order") and not r.method_options.get("static_groups")
                    for r in recipe.layer_recipes())
    if exporting and regrouped:
        raise ExportError(
            "act_order without static_groups stores a column permutation (g_idx) that compressed-tensors "
            "cannot load; set static_groups: true (the CLI's --act-order does)"
        )
    return planned


def _is_lowbit_export(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def quantize(source: str | None, recipe: Recipe, out_dir: Path | None, settings: Settings, *,
             overwrite: bool = False, evaluate_result: bool = True) -> QuantizeReport:
    """Quantize `source` with `recipe`, export to `out_dir`, and measure what it cost."""
    timer = _Timer()
    with timer("load"):
        loaded = load_model(source, settings.dtype)
    model = loaded.model
    architecture = architecture_of(model)
    check_plan(model, architecture, recipe, exporting=out_dir is not None)
    solver_needs_data = recipe.needs_calibration
    writer = None
    if out_dir is not None:
        writer = CompressedTensorsWriter(out_dir, overwrite=overwrite or _is_lowbit_export(out_dir))
    report = QuantizeReport(model=loaded.name, recipe=recipe, out_dir=out_dir, calibration="none (data-free)")
    report.original_megabytes = sum(p.numel() for p in model.parameters()) * REFERENCE_BITS / 8 / 1e6
    device = resolve_device(settings.device)

    with timer("calibration data"):
        calibration = None
        if solver_needs_data:
            calibration, report.calibration = resolve_calibration(
                settings.calib, model, loaded.tokenizer, settings.samples, settings.seq_len, settings.seed
            )
    reference = copy.deepcopy(model) if evaluate_result else None

    quantized_names: set[str] = set()

    def on_quantized(name: str, qweight: QuantizedWeight) -> None:
        quantized_names.add(name)
        report.linear_size.add(qweight)
        if writer is not None:
            writer.add_quantized(name, qweight)

    try:
        with timer("quantize"):
            SequentialQuantizer(
                model,
                architecture,
                recipe.plan(),
                device=device,
                batch_size=settings.batch_size,
                true_sequential=settings.true_sequential,
                on_quantized=on_quantized,
            ).run(calibration)
        if writer is not None:
            with timer("export"):
                _export(writer, loaded, quantized_names, report)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    if out_dir is not None:
        with timer("export check"):
            report.export_max_abs_diff = export_logit_difference(model, out_dir, loaded.tokenizer)
        report.checkpoint_megabytes = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6

    if evaluate_result:
        with timer("evaluate"):
            text, report.evaluation = resolve_evaluation_text(
                settings.eval_data, reference, loaded.tokenizer, settings.seed
            )
            tokens = tokenize_text(loaded.tokenizer, text)
            report.evaluation_result = evaluate(
                model, tokens, seq_len=settings.eval_seq_len, max_windows=settings.eval_windows,
                reference=reference, device=device,
            )
    report.seconds = timer.seconds
    report.quantized_model = model
    return report


def _export(
    writer: CompressedTensorsWriter, loaded: LoadedModel, quantized_names: set[str], report: QuantizeReport
) -> None:
    """Write the tensors the pipeline did not quantize (embeddings, norms, head), then finish."""
    dense = {
        name: tensor
        for name, tensor in loaded.model.state_dict().items()
        if name.removesuffix(".weight") not in quantized_names
    }
    writer.add_tensors(dense)
    writer.finish(
        loaded.model.config,
        tokenizer=loaded.tokenizer,
        generation_config=getattr(loaded.model, "generation_config", None),
        extra_metadata={
            "recipe": report.recipe.model_dump(),
            "source": loaded.name,
            "calibration": report.calibration,
        },
    )


@torch.no_grad()
def export_logit_difference(model: nn.Module, out_dir: Path, tokenizer, tokens: int = 64) -> float:
    """Max |logit difference| between the in-memory quantized model and its reloaded export."""
    reloaded, _ = load_quantized(out_dir, dtype=next(model.parameters()).dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
    device = next(model.parameters()).device
    expected = model(input_ids=ids.to(device)).logits.float().cpu()
    got = reloaded(input_ids=ids).logits.float()
    return float((expected - got).abs().max())


def open_model(source: str | None, dtype: str = "auto") -> tuple[nn.Module, object]:
    """(model, tokenizer) for a model source or a lowbit export folder; None or "default" is the embedded model."""
    if source is not None and _is_lowbit_export(Path(source)):
        return load_quantized(Path(source))
    loaded = load_model(None if source == "default" else source, dtype)
    return loaded.model, loaded.tokenizer


def evaluate_model(source: str | None, data: str | None, reference: str | None, settings: Settings) -> tuple[
    EvalResult, str
]:
    """Perplexity (and KL to `reference`) of a model or a lowbit export on an evaluation text."""
    model, tokenizer = open_model(source, settings.dtype)
    reference_model = None if reference is None else open_model(reference, settings.dtype)[0]
    text, description = resolve_evaluation_text(data, reference_model or model, tokenizer, settings.seed)
    tokens = tokenize_text(tokenizer, text)
    result = evaluate(
        model, tokens, seq_len=settings.eval_seq_len, max_windows=settings.eval_windows,
        reference=reference_model, device=resolve_device(settings.device),
    )
    return result, description


class _Timer:
    """Wall-clock seconds per named step, in the order the steps ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
