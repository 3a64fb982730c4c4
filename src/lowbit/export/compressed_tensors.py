"""Streaming writer of compressed-tensors checkpoints, the format vLLM serves and transformers loads.

The pipeline hands over each layer as soon as it is solved, so a model larger than memory can be
exported block by block:

    with CompressedTensorsWriter("out/model-w4") as writer:
        writer.add_quantized("model.layers.0.self_attn.q_proj", qweight)
        writer.add_tensors({"model.norm.weight": norm, ...})
        writer.finish(model.config, tokenizer, generation_config, {"recipe": recipe})

Everything goes into a hidden sibling folder that `finish` renames into place after checking the
export against the model its config describes (see `skeleton`): what appears at the requested
path is always complete. Layers are grouped into config groups by identical quantization settings
and each group names its layers explicitly, so mixed-precision recipes need no regular expressions.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import compressed_tensors
import safetensors
import torch
import transformers
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

import lowbit
from lowbit.export.errors import ExportError
from lowbit.export.layout import SchemeKey, pack_layer
from lowbit.export.lowbit_layout import LOWBIT_FORMAT, LOWBIT_QUANT_METHOD, needs_lowbit_layout
from lowbit.export.shards import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensors
from lowbit.export.skeleton import ModelSkeleton
from lowbit.export.staging import StagingDir
from lowbit.formats.activation import ActivationFormat
from lowbit.formats.base import QuantizedWeight

METADATA_FILE = "lowbit.json"


class CompressedTensorsWriter:
    """Writes one export folder; every method raises ExportError with a one-line reason."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        self.out_dir = Path(out_dir)
        self._staging = StagingDir(self.out_dir, overwrite)
        self._shards = ShardedSafetensors(self._staging.path, max_shard_bytes)
        self._schemes: dict[str, SchemeKey] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._scale_dtypes: set[torch.dtype] = set()
        self._packed_names: set[str] = set()
        """Tensors written by add_quantized (FP8's codes are named `<module>.weight`)."""
        self._dense_elements: Counter[torch.dtype] = Counter()
        self._closed = False

    def __enter__(self) -> CompressedTensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._closed:
            return
        self.abort()
        if exc_type is None:
            warnings.warn(f"export to {self.out_dir} was never finished; discarded it", stacklevel=2)

    def add_quantized(
        self,
        module_name: str,
        qweight: QuantizedWeight,
        activations: ActivationFormat | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        """Store the weight of linear `module_name` (e.g. "model.layers.3.self_attn.q_proj").

        `activations` is the format its input is rounded to at run time (its config group's
        `input_activations`), with `input_scale` the calibrated scale when that format is static.
        Its bias, if any, is an ordinary tensor for `add_tensors`.
        """
        self._check_open()
        if module_name.endswith(".weight"):
            raise ExportError(f"{module_name}: pass the module name, without '.weight'")
        if module_name in self._schemes:
            raise ExportError(f"{module_name} was added twice")
        static = activations is not None and not activations.dynamic
        if static != (input_scale is not None):
            raise ExportError(f"{module_name}: pass input_scale exactly when activation scales are static")
        key, tensors = pack_layer(module_name, qweight, activations)
        if input_scale is not None:
            tensors[f"{module_name}.input_scale"] = input_scale.detach().float().cpu().reshape(1).clone()
        for name, tensor in tensors.items():
            self._shards.add(name, tensor)
        self._packed_names.update(tensors)
        self._schemes[module_name] = key
        self._shapes[module_name] = (int(qweight.shape[0]), int(qweight.shape[1]))
        if not needs_lowbit_layout(qweight):  # lowbit's own layout decodes in float32, whatever the model's dtype
            self._scale_dtypes.add(qweight.scale.dtype)

    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store unquantized tensors (embeddings, norms, lm_head, biases) under their state-dict names.

        Tensors are copied, so callers may free or reuse theirs. A tied weight may be passed under
        both names (as `state_dict()` does) or once (as `named_parameters()` does).
        """
        self._check_open()
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ExportError(f"{name} is a {type(tensor).__name__}, not a tensor")
            stored = tensor.detach().to("cpu", copy=True).contiguous()
            self._shards.add(name, stored)
            if stored.is_floating_point():
                self._dense_elements[stored.dtype] += stored.numel()

    def finish(
        self,
        config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        generation_config: GenerationConfig | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Check the export against `config`, write the metadata files and move the folder into place.

        `extra_metadata` (e.g. the recipe) goes into lowbit.json under "metadata", which also says
        `complete: true`, written last. On any failure the partial folder is removed and nothing
        appears at `out_dir`.
        """
        self._check_open()
        self._closed = True
        try:
            config = self._output_config(config)
            ignore = self._check_complete(ModelSkeleton.from_config(config))
            self._warn_on_scale_rounding(config.dtype)
            self._shards.finish()
            folder = self._staging.path
            config_dict = json.loads(config.to_json_string())
            config_dict["torch_dtype"] = config_dict.get("dtype")  # the name before transformers 4.56
            config_dict["quantization_config"] = self._quantization_config(ignore)
            _write_json(folder / "config.json", config_dict)
            if generation_config is not None:
                generation_config.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            _write_json(folder / METADATA_FILE, self._metadata(extra_metadata))
            self._staging.commit()
        except BaseException:
            self._staging.discard()
            raise
        return self.out_dir

    def abort(self) -> None:
        """Throw the partial export away; the writer cannot be used afterwards."""
        self._closed = True
        self._staging.discard()

    def _check_open(self) -> None:
        if self._closed:
            raise ExportError(f"the writer for {self.out_dir} is already finished or aborted")

    def _output_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """A copy without the source's own quantization (e.g. GGUF's) and with the written dtype."""
        config = copy.deepcopy(config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if self._dense_elements:
            config.dtype = self._dense_elements.most_common(1)[0][0]
        return config

    def _check_complete(self, skeleton: ModelSkeleton) -> list[str]:
        """Refuse an export transformers would load with random or mismatched weights; return the
        linears left unquantized, which the config must list in `ignore` (vLLM requires it)."""
        if not self._schemes:
            raise ExportError("no quantized layer was added; there is nothing to write as compressed-tensors")
        for name, shape in self._shapes.items():
            if name not in skeleton.linears:
                raise ExportError(f"{name} is not a linear layer of the model the config describes")
            if skeleton.linears[name] != shape:
                expected = list(skeleton.linears[name])
                raise ExportError(f"{name}: quantized weight is {list(shape)}, the model's is {expected}")
        dense = self._shards.names - self._packed_names
        doubled = sorted(f"{name}.weight" for name in self._schemes if f"{name}.weight" in dense)
        if doubled:
            raise ExportError(f"{doubled[0]} was added both quantized and unquantized")
        written = self._shards.names | {f"{name}.weight" for name in self._schemes}
        missing = sorted(skeleton.tensor_names - written)
        if missing:
            shown = ", ".join(missing[:3])
            raise ExportError(f"the export lacks {len(missing)} tensor(s) the model needs: {shown}")
        return sorted(set(skeleton.linears) - set(self._schemes))

    def _warn_on_scale_rounding(self, dtype: torch.dtype | None) -> None:
        """transformers loads scales into parameters of the model dtype before multiplying (vLLM
        creates its scale parameters in the model dtype too), so scales that dtype cannot hold
        exactly make the served model differ from the one lowbit measured."""
        if dtype in (None, torch.float32):
            return
        for scale_dtype in sorted(self._scale_dtypes - {dtype}, key=str):
            warnings.warn(
                f"scales are stored as {scale_dtype} but the model loads as {dtype}, which rounds them; "
                f"quantize with scale dtype {dtype} to serve exactly the measured model",
                stacklevel=3,
            )

    def _quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        groups: dict[SchemeKey, list[str]] = {}
        for name, key in self._schemes.items():
            groups.setdefault(key, []).append(name)
        compressions = {key.compression for key in groups}
        if LOWBIT_FORMAT in compressions:
            return self._lowbit_quantization_config(groups, compressions, ignore)
        config = QuantizationConfig(
            config_groups={
                f"group_{number}": QuantizationScheme(
                    targets=names, weights=key.to_args(), input_activations=key.input_args(), format=key.compression
                )
                for number, (key, names) in enumerate(groups.items())
            },
            format=compressions.pop() if len(compressions) == 1 else "mixed-precision",
            quantization_status="compressed",
            ignore=ignore,
        )
        return {"version": compressed_tensors.__version__, **config.model_dump(mode="json")}

    @staticmethod
    def _lowbit_quantization_config(
        groups: dict[SchemeKey, list[str]], compressions: set[str], ignore: list[str]
    ) -> dict[str, Any]:
        """lowbit's own config (see lowbit_layout): a quant_method transformers refuses to guess at."""
        if compressions != {LOWBIT_FORMAT}:
            raise ExportError(
                "an export holds either compressed-tensors layers or lowbit-layout layers (nf4, lut, fp8_e5m2, vq), "
                "not both; use one format family for every layer"
            )
        return {
            "quant_method": LOWBIT_QUANT_METHOD,
            "format": LOWBIT_FORMAT,
            "config_groups": {
                f"group_{number}": {"targets": names, "format": dict(key.description)}
                for number, (key, names) in enumerate(groups.items())
            },
            "ignore": ignore,
        }

    def _metadata(self, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "lowbit_version": lowbit.__version__,
            "export_format": "lowbit" if any(
                key.compression == LOWBIT_FORMAT for key in self._schemes.values()
            ) else "compressed-tensors",
            "complete": True,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "compressed_tensors": compressed_tensors.__version__,
                "safetensors": safetensors.__version__,
            },
            "quantized_layers": len(self._schemes),
            "metadata": dict(extra or {}),
        }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Values JSON cannot hold (dtypes, paths) are written as text rather than failing the export."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
