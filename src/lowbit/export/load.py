"""Loading an export back through transformers, as any user of the checkpoint would, for evaluation.

The model goes through transformers' regular compressed-tensors path: the packed weights load,
then are decompressed to dense weights in the model dtype (`dequantize` in forward.py: codes and
zero points converted to the dtype of the scale parameter, which transformers created in the
model dtype, then multiplied). Decompression is done here rather than on the first forward pass
so that callers get plain dense weights.

That equals lowbit's `QuantizedWeight.dequantize()` cast to the model dtype, bit for bit, whenever
the model dtype holds the stored scales exactly (a float32 model, or scales stored in the model
dtype): |code - zero| < 256 has at most 8 significant bits and a float16/bfloat16 scale at most
11, so lowbit's float32 product is exact and both sides round the same exact value once (float32
scales: both do the same float32 multiply). Otherwise (float16 scales in a bfloat16 model) the
loaders round the scales first; the writer warns.

Layers whose config group quantizes their inputs (W8A8, FP8) get lowbit's input quantizer back
(see `input_load`), so evaluating the reloaded model measures the weight-and-activation model.

The other path transformers offers, `CompressedTensorsConfig(dequantize=True)`, is avoided: in
transformers 5.24 it decodes every layer with the first config group's scheme, silently producing
wrong weights for mixed-precision exports, and it multiplies in the stored scale dtype instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.offload import remove_dispatch
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.utils import TensorStateDict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.export.errors import ExportError
from lowbit.export.float_layout import unpack_fp4
from lowbit.export.input_load import restore_input_quantization
from lowbit.formats.minifloat import E2M1
from lowbit.export.lowbit_load import load_lowbit_layout
from lowbit.export.lowbit_layout import LOWBIT_QUANT_METHOD
from lowbit.export.compressed_tensors import METADATA_FILE
from lowbit.export.shards import INDEX_FILE, SINGLE_FILE
from lowbit.transforms import online

RUN_MANIFEST = "lowbit-run.json"
"""The manifest of an interrupted run (lowbit.pipeline.resume)."""


def check_export_folder(path: str | os.PathLike[str]) -> str | None:
    """Why `path` is not a complete compressed-tensors export, or None if it looks complete."""
    folder = Path(path)
    if not folder.is_dir():
        return f"{folder} is not a directory"
    unfinished = _unfinished_run(folder)
    if unfinished:
        return unfinished
    config_path = folder / "config.json"
    if not config_path.is_file():
        return f"{folder} has no config.json, so it is not a finished export"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        return f"{config_path} cannot be read: {error}"
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in ("compressed-tensors", LOWBIT_QUANT_METHOD):
        return f"{folder} is not a compressed-tensors export nor a lowbit one (its quant_method is {method!r})"
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            shards = set(json.loads(index_path.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as error:
            return f"{index_path} cannot be read: {error!r}"
        absent = sorted(shard for shard in shards if not (folder / shard).is_file())
        if absent:
            return f"{folder} lacks weight shard(s) listed in {INDEX_FILE}: {', '.join(absent)}"
    elif not (folder / SINGLE_FILE).is_file():
        return f"{folder} has no weights ({SINGLE_FILE} or {INDEX_FILE})"
    return None


def _unfinished_run(folder: Path) -> str | None:
    """Why `folder` is an interrupted run rather than an export, or None.

    A lowbit export is complete once its lowbit.json says `complete: true` (written last, by the
    writer's finish; exports of lowbit versions before the flag existed lack it and were only
    ever written complete); the state of an interrupted run carries `complete: false`.
    """
    for name in (RUN_MANIFEST, METADATA_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            return f"{path} cannot be read ({error}); the export is damaged, quantize again"
        legacy = name == METADATA_FILE and isinstance(manifest, dict) and "complete" not in manifest
        if not legacy and (not isinstance(manifest, dict) or manifest.get("complete") is not True):
            done = manifest.get("blocks_done", "?") if isinstance(manifest, dict) else "?"
            total = manifest.get("blocks_total", "?") if isinstance(manifest, dict) else "?"
            return (
                f"{folder} is an unfinished lowbit run ({done} of {total} blocks); finish it with "
                "`lowbit quantize ... --resume` and the same options"
            )
    return None


def load_quantized(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    replacements: Mapping[str, nn.Module] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The exported model with dense weights on `device` (in `dtype`, default the export's), in eval
    mode, and its tokenizer (None if the export has none).

    `replacements`: modules that take the named layers' places before the weights are decompressed
    or decoded, so those layers' codes are never decoded to dense weights (export/packed_load.py
    runs them on their codes)."""
    folder = Path(path)
    problem = check_export_folder(folder)
    if problem:
        raise ExportError(problem)
    if _quant_method(folder) == LOWBIT_QUANT_METHOD:
        model = load_lowbit_layout(folder, device, dtype, replacements)
        _restore_online_rotations(model, folder)
        return model, _tokenizer(folder)
    with _packed_zero_points_on_meta():
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", device_map={"": device}, output_loading_info=True
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ExportError(f"{folder} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:3])}")
    for name, module in (replacements or {}).items():  # before decompression, which skips them
        model.set_submodule(name, module.to(device))
    exact = _fp4_weights(model)
    model.hf_quantizer.compressor.decompress_model(model)
    model_dtype = model.get_input_embeddings().weight.dtype  # the decompressor leaves FP4 layers in bfloat16
    for name, weight in exact.items():
        module = model.get_submodule(name)
        module.weight.data = weight.to(dtype=model_dtype, device=module.weight.device)
    # compressed-tensors leaves every module's tensors in an offload cache that copies them back to
    # where they were loaded: model.to(cuda) would then leave them on the CPU. Plain modules here.
    remove_dispatch(model, onload_tensors=True)
    _restore_online_rotations(model, folder)  # first: inputs are rotated, then rounded (pre-hooks run in order)
    restore_input_quantization(model, folder)
    model.eval()
    return model, _tokenizer(folder)


def _restore_online_rotations(model: PreTrainedModel, folder: Path) -> None:
    """Re-attach the online Hadamards of a rotated export (quarot, spinquant), which the checkpoint's
    tensors cannot express: its lowbit.json lists them."""
    online.restore(model, _online_rotations(folder))


def _online_rotations(folder: Path) -> list[dict]:
    metadata = json.loads((folder / METADATA_FILE).read_text()).get("metadata", {}) if (
        folder / METADATA_FILE).is_file() else {}
    return metadata.get(online.METADATA_KEY, [])


def online_rotation_layers(path: str | os.PathLike[str]) -> set[str]:
    """Names of the layers of an export that carry an online Hadamard on their input (restored on load)."""
    return {layer["module"] for layer in _online_rotations(Path(path))}


@torch.no_grad()
def _fp4_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """float32 weights of the NVFP4/MXFP4 layers, decoded from their packed tensors.

    compressed-tensors 0.20 decompresses packed FP4 through bfloat16 (its unpacker's default),
    which rounds e2m1 · (block scale / tensor scale) to 8 significant bits; decoding here keeps
    the exact float32 product, the values lowbit measured (and the ones FP4 kernels compute with).
    """
    weights = {}
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None or args.type != "float" or args.num_bits != 4 or not hasattr(module, "weight_packed"):
            continue
        codes = unpack_fp4(module.weight_packed.data.cpu())
        scale = module.weight_scale.data.cpu()
        if scale.dtype == torch.uint8:  # MX: E8M0 exponent bytes
            scale = torch.ldexp(torch.ones(scale.shape), scale.to(torch.int32) - 127)
        else:
            scale = scale.float()
        global_scale = getattr(module, "weight_global_scale", None)
        if global_scale is not None:
            scale = scale / global_scale.data.cpu().float()
        rows, columns = codes.shape
        values = E2M1.decode(codes).reshape(rows, columns // args.group_size, args.group_size)
        weights[name] = (values * scale.unsqueeze(-1)).reshape(rows, columns)
    return weights


def _tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    has_tokenizer = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
    return AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def _quant_method(folder: Path) -> str | None:
    return json.loads((folder / "config.json").read_text())["quantization_config"].get("quant_method")


@contextmanager
def _packed_zero_points_on_meta() -> Iterator[None]:
    """Let transformers load asymmetric group/channel `pack-quantized` layers (compressed-tensors 0.20).

    Before loading, transformers "compresses" the empty (meta) model to get parameters of the
    checkpoint's shapes, but compressed-tensors leaves the zero point of empty weights unpacked
    ([out, groups] int8) while checkpoints, its own compressor's output included, hold it packed
    ([ceil(out * bits / 32), groups] int32); loading then stops at a shape mismatch. This gives the
    empty zero point its packed shape for the duration of one load. It does nothing once
    compressed-tensors returns packed shapes itself.
    """
    original = PackedQuantizationCompressor.__dict__["compress"]

    def compress(cls: type, state_dict: TensorStateDict, scheme: QuantizationScheme) -> TensorStateDict:
        compressed = original.__func__(cls, state_dict, scheme)
        zero = compressed.get("weight_zero_point")
        packed = compressed.get("weight_packed")
        if (
            zero is not None
            and packed is not None
            and packed.device.type == "meta"
            and zero.dtype != torch.int32
            and scheme.weights.strategy in ("group", "channel")
        ):
            packed_rows = math.ceil(zero.shape[0] * scheme.weights.num_bits / 32)
            packed_shape = (packed_rows, *zero.shape[1:])
            compressed["weight_zero_point"] = torch.empty(packed_shape, dtype=torch.int32, device="meta")
        return compressed

    PackedQuantizationCompressor.compress = classmethod(compress)
    try:
        yield
    finally:
        PackedQuantizationCompressor.compress = original
