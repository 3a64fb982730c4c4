"""The Python entry points behind `lowbit quantize`, `lowbit eval` and `lowbit generate`.

Each step (load, calibrate, quantize, export, check, evaluate) lives in its own package; this module
only puts them in order, times them and returns the numbers the report prints.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lowbit.calibrate.data import resolve_calibration, resolve_evaluation_text, tokenize_text
from lowbit.evaluate import EvalResult, evaluate
from lowbit.evaluate.kv_protocol import DEFAULT_CHUNK, CacheScoring
from lowbit.export import CompressedTensorsWriter, ExportError, check_exportable, load_quantized
from lowbit.export.compressed_tensors import METADATA_FILE
from lowbit.export.layout import activation_export_problem
from lowbit.formats.base import QuantizedWeight
from lowbit.kv import KVCacheSpec
from lowbit.kv.spec import ROW_KINDS
from lowbit.models.architectures import Architecture, architecture_of
from lowbit.models.checks import check_finite_weights, check_folder_architecture
from lowbit.models.loading import LoadedModel, default_model_path, folder_skeleton, load_model
from lowbit.models.streaming import STREAMED_SHARD_BYTES, StreamedModel, should_stream
from lowbit.modules.input_quant import input_quantizer, quantize_inputs
from lowbit.pipeline.activations import SpilledActivations
from lowbit.pipeline.distributed import DistributedError, device_for, join_world
from lowbit.pipeline.resume import RunCheckpoint, digest, model_identity, tensor_digest
from lowbit.pipeline.sequential import SequentialQuantizer
from lowbit.recipes import Recipe, RecipeError
from lowbit.transforms import online
from lowbit.transforms.model import apply_model_transforms

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
    offload: str = "auto"
    """"disk": stream the model's blocks from its safetensors files (lowbit.models.streaming);
    "auto": do so when the weights would not fit in memory; "none": load the whole model."""
    resume: bool = False
    """Continue the interrupted run that wrote the same output folder (lowbit.pipeline.resume)."""
    offload_activations: bool = False
    """Keep calibration activations in memory-mapped files instead of memory."""
    kv_cache: KVCacheSpec | Literal["none"] | None = None
    """Evaluate through this quantized KV cache; None: the recipe's or the export's own (if any);
    "none": a full-precision single pass even where the export names a KV cache."""
    kv_chunk: int = DEFAULT_CHUNK
    """Tokens per forward pass when scoring through a KV cache (lowbit.evaluate.kv_protocol)."""


@dataclass
class SizeReport:
    """Storage of the quantized linear layers, scales and zero points included."""

    parameters: int = 0
    bits: float = 0.0

    def add(self, qweight: QuantizedWeight) -> None:
        count = qweight.weight_count
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
    """--device as a torch device; a CUDA device this machine lacks is a one-line error, not torch's assertion."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return device


def check_plan(model: nn.Module, architecture: Architecture, recipe: Recipe, exporting: bool) -> int:
    """Validate every layer's format before any work starts; returns the number of layers planned."""
    plan = recipe.plan()
    planned = 0

    def check(full_name: str, linear: nn.Linear) -> bool:
        """Whether the plan quantizes the linear; refused here if its format cannot be exported."""
        choice = plan(full_name, linear)
        if choice is not None and exporting:
            problem = check_exportable(choice[0], linear.in_features, full_name) or activation_export_problem(
                choice[0], recipe.activations, full_name)
            if problem:
                raise ExportError(problem)
        return choice is not None

    for index, block in enumerate(architecture.block_list(model)):
        for names in architecture.linear_groups:
            for name in names:
                planned += check(f"{architecture.blocks}.{index}.{name}", block.get_submodule(name))
    if planned == 0:
        raise ValueError("the recipe's ignore list leaves no layer to quantize")
    blocks = f"{architecture.blocks}."
    outside = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not name.startswith(blocks) and name != architecture.head
               and plan(name, module) is not None]
    if outside:
        raise RecipeError(f"{', '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside the decoder blocks, "
                          f"and lowbit quantizes the blocks' linears and the output head ({architecture.head}) only: "
                          f"add {', '.join(repr(name) for name in outside)} to the recipe's ignore list")
    check(architecture.head, model.get_submodule(architecture.head))
    problems = {r.solver().export_problem for r in recipe.layer_recipes()} - {None}
    if exporting and problems:
        raise ExportError(sorted(problems)[0])
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
    check_folder_architecture(source)
    world = join_world(resolve_device(settings.device))
    if world.size > 1 and (settings.resume or settings.offload_activations):
        raise DistributedError("--resume and --offload-activations work in a single process; drop them or run one")
    if world.size > 1 and recipe.transform_names():
        # Their statistics are gathered per process and not yet summed across processes, so each
        # process would rescale its copy of the model differently.
        raise DistributedError(f"transforms ({', '.join(recipe.transform_names())}) work in a single process; run one")
    if settings.resume and any(r.outliers or r.eora_rank or r.format == "binary" for r in recipe.layer_recipes()):
        raise ValueError("--resume does not yet keep outliers, EoRA factors or binary salient masks; rerun without it")
    if recipe.activations is not None and not recipe.activations.dynamic and (world.size > 1 or settings.resume):
        # The calibrated maxima are neither reduced across processes nor saved with a block's commit.
        raise RecipeError("static activation scales work in a single process without --resume; "
                          "drop them or use dynamic activations")
    model_transforms = recipe.model_transforms()
    if model_transforms and settings.offload == "disk":
        raise ValueError("rotations (--transform hadamard/quarot/spinquant) need the whole model in memory; "
                         "drop --offload disk")
    if settings.resume and any(t.needs_calibration for t in model_transforms):
        raise ValueError("--resume cannot replay a learned rotation (spinquant); quantize without --resume")
    if not world.is_main:  # process 0 alone writes and evaluates
        out_dir, evaluate_result = None, False
    streaming = should_stream(source, settings.offload) and not model_transforms
    skeleton = None if streaming else folder_skeleton(source)  # a streamed model is built empty anyway
    if skeleton is not None:  # a wrong group size or ignore list fails now, not after minutes of loading
        check_plan(skeleton, architecture_of(skeleton), recipe.for_model_dtype(skeleton.dtype),
                   exporting=out_dir is not None)
    streamed = None
    with timer("load"):
        if streaming:
            if settings.offload == "auto":
                logging.getLogger(__name__).warning(
                    "the weights of %s exceed half of the free memory: streaming its blocks from disk "
                    "(--offload disk); evaluation is skipped (pass --offload none to load it whole)", source
                )
            streamed = StreamedModel(source, settings.dtype)
            loaded = streamed.loaded
            evaluate_result = False  # evaluation and the export check need the whole model in memory
        else:
            loaded = load_model(source, settings.dtype)
    model = loaded.model
    recipe = recipe.for_model_dtype(next(model.parameters()).dtype)  # scales in the dtype engines load them in
    architecture = architecture_of(model)
    check_finite_weights(model.state_dict().items())
    check_plan(model, architecture, recipe, exporting=out_dir is not None)
    if not recipe.is_ignored(architecture.head):
        if streamed is not None:
            raise ValueError(f"quantizing the output head ({architecture.head}) needs the whole model in memory; "
                             "pass --offload none, or keep it in the recipe's ignore list")
        if settings.resume:
            raise ValueError(f"--resume does not cover a quantized output head ({architecture.head}) yet; "
                             "quantize without --resume, or keep it in the recipe's ignore list")
        head = model.get_output_embeddings()
        if head.weight is model.get_input_embeddings().weight:
            logging.getLogger(__name__).warning(
                "%s shares its weight with the input embedding: quantizing it adds a quantized copy beside "
                "the 16-bit embedding, so the checkpoint grows by about %.1f MB while the head's matmul reads "
                "fewer bytes",
                architecture.head, head.weight.numel() * recipe.bits / 8 / 1e6)
    solver_needs_data = recipe.needs_calibration()
    writer = None
    checkpoint = None
    if out_dir is not None and world.size == 1:
        checkpoint = RunCheckpoint.claim(out_dir, resume=settings.resume, overwrite=overwrite)
    if out_dir is not None:
        try:
            writer = CompressedTensorsWriter(
                out_dir, overwrite=overwrite or _is_lowbit_export(out_dir),
                **({"max_shard_bytes": STREAMED_SHARD_BYTES} if streamed is not None else {}),
            )
        except BaseException:
            if checkpoint is not None:
                checkpoint.abandon()
            raise
    report = QuantizeReport(model=loaded.name, recipe=recipe, out_dir=out_dir, calibration="none (data-free)")
    report.original_megabytes = sum(p.numel() for p in model.parameters()) * REFERENCE_BITS / 8 / 1e6
    device = device_for(world, resolve_device(settings.device))

    quantized_names: set[str] = set()

    def on_quantized(name: str, qweight: QuantizedWeight) -> None:
        quantized_names.add(name)
        report.linear_size.add(qweight)
        linear = model.get_submodule(name)
        quantizer = input_quantizer(linear)
        if quantizer is None and recipe.activations is not None:  # a layer replayed by --resume
            quantizer = quantize_inputs(linear, recipe.activations)
        if writer is not None:
            activations, scale = (None, None) if quantizer is None else (quantizer.fmt, quantizer.scale)
            writer.add_quantized(name, qweight, activations, scale)

    spill_folder = None
    try:
        with timer("calibration data"):
            calibration = None
            if solver_needs_data:
                calibration, report.calibration = resolve_calibration(
                    settings.calib, model, loaded.tokenizer, settings.samples, settings.seq_len, settings.seed
                )
        reference = copy.deepcopy(model) if evaluate_result else None
        if model_transforms:
            with timer("rotate"):
                apply_model_transforms(model_transforms, model, architecture, recipe.layer_formats(), calibration)
        plan = recipe.plan()
        hooks, keep_output, start_block, start_hidden, callback = [], None, 0, None, on_quantized
        if streamed is not None:
            hooks.append(streamed)
        if checkpoint is not None:
            fingerprint = run_fingerprint(source, loaded, recipe, calibration, settings, device)
            blocks_total = len(architecture.block_list(model))
            start_block = checkpoint.start(fingerprint, blocks_total, offload_activations=settings.offload_activations)
            checkpoint.replay(model, architecture, plan, on_quantized, set_weights=streamed is None)
            start_hidden = checkpoint.start_hidden()
            hooks.append(checkpoint)
            keep_output, callback = checkpoint.keep_output, checkpoint.recording(on_quantized)
        elif settings.offload_activations and calibration is not None:
            spill_folder = tempfile.TemporaryDirectory(prefix="lowbit-activations-")
            spill = SpilledActivations(Path(spill_folder.name))
            hooks.append(spill)
            keep_output = spill.keep
        with timer("quantize"):
            SequentialQuantizer(
                model,
                architecture,
                plan,
                device=device,
                batch_size=settings.batch_size,
                true_sequential=settings.true_sequential,
                on_quantized=callback,
                transforms=recipe.block_transforms(),
                reduce_stats=world.reduce_stats,
                hooks=hooks,
                keep_output=keep_output,
                activations=recipe.activations,
                quantize_head=True,  # where the recipe does not ignore it
            ).run(world.shard(calibration), start_block=start_block, start_hidden=start_hidden)
        world.leave()
        if writer is not None:
            with timer("export"):
                dense = streamed.dense_tensors(quantized_names) if streamed is not None else None
                _export(writer, loaded, quantized_names, report, dense)
            if checkpoint is not None:
                checkpoint.remove()
    except BaseException as error:
        if writer is not None:
            writer.abort()
        if checkpoint is not None:
            checkpoint.abandon()
        if isinstance(error, torch.cuda.OutOfMemoryError):
            raise OutOfMemory() from error
        raise
    finally:
        if spill_folder is not None:
            spill_folder.cleanup()

    if out_dir is not None and streamed is None:
        with timer("export check"):
            report.export_max_abs_diff = export_logit_difference(model, out_dir, loaded.tokenizer)

    if evaluate_result:
        with timer("evaluate"):
            text, report.evaluation = resolve_evaluation_text(
                settings.eval_data, reference, loaded.tokenizer, settings.seed
            )
            tokens = tokenize_text(loaded.tokenizer, text)
            report.evaluation_result = evaluate(
                model, tokens, seq_len=settings.eval_seq_len, max_windows=settings.eval_windows,
                reference=reference, device=device, kv_cache=kv_scoring(settings, recipe.kv_cache),
            )
    if out_dir is not None:
        report.checkpoint_megabytes = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6
    report.seconds = timer.seconds
    report.quantized_model = model if streamed is None else None
    return report


class OutOfMemory(MemoryError):
    """The accelerator ran out of memory; the message names the options that use less of it."""

    def __init__(self) -> None:
        super().__init__(
            "out of GPU memory while quantizing; rerun with --resume and --offload-activations "
            "(calibration activations on disk), a smaller --batch-size, or --device cpu"
        )


def run_fingerprint(
    source: str | None, loaded: LoadedModel, recipe: Recipe, calibration: torch.Tensor | None,
    settings: Settings, device: torch.device,
) -> dict[str, str]:
    """What must be equal for an interrupted run to continue into a bit-identical export."""
    if source is None:
        location: Path | None = default_model_path()
    else:
        location = Path(source).expanduser()
        location = location if location.exists() else None
    outcome = {
        "true_sequential": settings.true_sequential,
        "batch_size": settings.batch_size,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "device": device.type,
    }
    return {
        "recipe": digest(json.dumps(recipe.model_dump(), sort_keys=True, default=str)),
        "model": model_identity(location, loaded.model.config.to_json_string(), loaded.name),
        "calibration": tensor_digest(calibration),
        "settings": digest(json.dumps(outcome, sort_keys=True)),
    }


def _export(
    writer: CompressedTensorsWriter, loaded: LoadedModel, quantized_names: set[str], report: QuantizeReport,
    dense: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> None:
    """Write the tensors the pipeline did not quantize (embeddings, norms, head), then finish.

    `dense` streams them one by one (a model read from disk); by default they come from the model.
    Online Hadamards (quarot, spinquant) have no tensors: the metadata lists them for the loader."""
    rotations = online.describe(loaded.model)
    if dense is None:
        # A tied weight (lm_head under tie_word_embeddings) once, under the name its module
        # registered first, as transformers saves it: loaders tie it again from the config.
        model = loaded.model
        owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        writer.add_tensors({
            name: tensor
            for name, tensor in model.state_dict().items()
            if name in owned and name.removesuffix(".weight") not in quantized_names
        })
    else:
        for name, tensor in dense:
            writer.add_tensors({name: tensor})
    writer.finish(
        loaded.model.config,
        tokenizer=loaded.tokenizer,
        generation_config=getattr(loaded.model, "generation_config", None),
        extra_metadata={
            "recipe": report.recipe.model_dump(),
            "source": loaded.name,
            "calibration": report.calibration,
            **({online.METADATA_KEY: rotations} if rotations else {}),
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


def saved_kv_cache(source: str | None) -> KVCacheSpec | None:
    """The KV cache a lowbit export's recipe names (`quantize --kv-cache`), if any."""
    if source is None or not _is_lowbit_export(Path(source)):
        return None
    recipe = json.loads((Path(source) / METADATA_FILE).read_text()).get("metadata", {}).get("recipe", {})
    saved = recipe.get("kv_cache")
    return None if saved is None else KVCacheSpec.model_validate(saved)


def kv_scoring(settings: Settings, default: KVCacheSpec | None) -> CacheScoring | None:
    """How to score through a KV cache: the settings' cache, else `default`; None for a plain pass."""
    spec = default if settings.kv_cache is None else settings.kv_cache
    if spec is None or spec == "none":
        return None
    return CacheScoring(spec, settings.kv_chunk)


def evaluate_model(source: str | None, data: str | None, reference: str | None, settings: Settings) -> tuple[
    EvalResult, str
]:
    """Perplexity (and KL to `reference`) of a model or a lowbit export on an evaluation text.

    A KV cache (from the settings, or the one the export's recipe names) scores the model chunk
    by chunk through that cache and the reference through a full-precision one."""
    device = resolve_device(settings.device)  # before the model loads: a wrong --device fails at once
    model, tokenizer = open_model(source, settings.dtype)
    reference_model = None if reference is None else open_model(reference, settings.dtype)[0]
    text, description = resolve_evaluation_text(data, reference_model or model, tokenizer, settings.seed)
    tokens = tokenize_text(tokenizer, text)
    result = evaluate(
        model, tokens, seq_len=settings.eval_seq_len, max_windows=settings.eval_windows,
        reference=reference_model, device=device,
        kv_cache=kv_scoring(settings, saved_kv_cache(source)),
    )
    return result, description


@dataclass
class GenerateReport:
    """What `generate_text` produced and how fast: greedy tokens after the prompt, timed alone; `text`
    and `tokens` are the first row's, up to its end token. `load_seconds`: reading the model onto
    the device; `warmup_seconds`: the graph capture (on a GPU the first step tunes the kernels for
    each weight shape, or loads the tuning an earlier run kept); `prompt_seconds`: reading the
    prompt into the cache (the first run tunes the prompt's matmul shapes too)."""

    text: str
    tokens: list[int]
    new_tokens: int
    batch: int
    seconds: float
    load_seconds: float
    warmup_seconds: float
    prompt_seconds: float
    packed_layers: int
    fused_step: bool
    graph: bool
    device: str
    kv_cache: str
    """The decoder's KV cache: "bfloat16" and the like, or the coded cache's name ("int8-token", "fp8")."""
    kv_cache_bytes: int
    """Bytes the decoder's KV cache holds (batch x prompt + new tokens positions, every layer)."""

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.new_tokens / self.seconds


@torch.no_grad()
def generate_text(source: str | None, prompt: str, new_tokens: int, batch: int = 1, device: str = "auto",
                  dtype: str = "auto", chat: bool = False, kv_cache: KVCacheSpec | Literal["none"] | None = None,
                  progress: Callable[[str], None] | None = None) -> GenerateReport:
    """Greedy continuation of `prompt` by a model or a lowbit export, in lowbit's static decoder.

    On a GPU an export runs on its codes (QuantLinear's W4A16 kernels, VQLinear) wherever they hold
    a layer (export/packed_load.py), and each token step is one CUDA graph. On a CPU it runs on its
    dense reload: there the int4 matmul is the reference one, which decodes the whole weight on every
    call. The prompt is fed `batch` times, so the timing is of that batch size. `chat`: the prompt
    is a user's message, wrapped in the tokenizer's chat template (instruction-tuned models).
    `kv_cache`: decode through this int8-token or fp8 cache; None: the one an export's recipe
    names, if one of those (an intN cache there is noted and not applied); "none": keys and values
    in the model's dtype.
    `progress` is told each phase as it starts: loading, warming up (on a GPU a new weight shape's
    kernels are compiled and timed first, which can take a minute), generating."""
    from lowbit.export.packed_load import load_packed
    from lowbit.generate import StaticDecoder

    if not prompt.strip():
        raise ValueError("the prompt is empty; give --prompt some text")
    target = resolve_device(device)
    say = progress or (lambda message: None)
    say(f"loading {source or 'the default model'} onto {target}")
    start = time.perf_counter()
    if source is not None and _is_lowbit_export(Path(source)) and target.type == "cuda":
        model, tokenizer, packed = load_packed(Path(source), target, None if dtype == "auto" else getattr(torch, dtype))
    else:
        model, tokenizer = open_model(source, dtype)
        model, packed = model.to(target), 0
    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer to read the prompt with; export the model with its tokenizer")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source or 'the model'}'s tokenizer has no chat template; drop --chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False) if chat else prompt
    ids = torch.tensor([tokenizer(text, add_special_tokens=not chat)["input_ids"]], device=target).expand(batch, -1)
    spec = _decoder_kv_cache(source, kv_cache, say)
    decoder = StaticDecoder(model, batch=batch, max_len=ids.shape[1] + new_tokens, kv_cache=spec)
    _synchronize(target)
    loaded = time.perf_counter() - start
    graph = target.type == "cuda"
    start = time.perf_counter()
    if graph:
        say("warming up: capturing the step as a CUDA graph (a weight shape's first run compiles and times its "
            "kernels; later runs load the choice)")
        decoder.capture()
        _synchronize(target)
    warmup = time.perf_counter() - start
    say(f"reading the prompt ({batch} x {ids.shape[1]} tokens)")
    start = time.perf_counter()
    decoder.prefill(ids)
    _synchronize(target)
    prompt_seconds = time.perf_counter() - start
    say(f"generating {batch} x {new_tokens} tokens")
    start = time.perf_counter()
    tokens = decoder.decode(new_tokens)
    _synchronize(target)
    seconds = time.perf_counter() - start
    first = tokens[0].tolist()
    if tokenizer.eos_token_id in first:
        first = first[: first.index(tokenizer.eos_token_id)]
    return GenerateReport(tokenizer.decode(first, skip_special_tokens=True), first, new_tokens, batch, seconds,
                          loaded, warmup, prompt_seconds, packed, decoder.fused, graph, str(target),
                          str(model.dtype).removeprefix("torch.") if spec is None else spec.name,
                          decoder.cache_bytes())


def _decoder_kv_cache(source: str | None, asked: KVCacheSpec | Literal["none"] | None,
                      say: Callable[[str], None]) -> KVCacheSpec | None:
    """The KV cache the static decoder keeps: the one asked for, else an export's int8-token or fp8 cache."""
    if asked == "none":
        return None
    if asked is not None:
        return asked
    saved = saved_kv_cache(source)
    if saved is not None and saved.kind not in ROW_KINDS:
        say(f"note: the export's {saved.describe()} is not applied here: the decoder keeps an int8-token or fp8 "
            "KV cache or none (--kv-cache int8-token; `lowbit eval` scores through the intN cache)")
        return None
    return saved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
